//! Where the daemon is: its socket (for every client) and its default paths (which the daemon's config
//! starts from, so both sides agree), and the state directory a client-started daemon writes to.
use std::path::{Path, PathBuf};

/// The default paths for the current user.
pub struct Defaults {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_file: PathBuf,
}

/// Where the system daemon (bangerd run as root, e.g. by scripts/quickstart.sh or its systemd unit) listens.
pub const SYSTEM_SOCKET: &str = "/run/banger/bangerd.sock";

impl Defaults {
    /// The socket a client talks to: `BANGER_SOCKET` if set, else the system daemon's when one is there (so
    /// every user of the workstation finds the daemon set-up started), else this user's own daemon's.
    pub fn client_socket() -> PathBuf {
        let explicit = std::env::var_os("BANGER_SOCKET").is_some_and(|v| !v.is_empty());
        Self::pick_client_socket(explicit, Path::new(SYSTEM_SOCKET).exists(), Self::detect().socket)
    }

    fn pick_client_socket(explicit: bool, system_exists: bool, own: PathBuf) -> PathBuf {
        if explicit || !system_exists {
            own
        } else {
            PathBuf::from(SYSTEM_SOCKET)
        }
    }

    pub fn detect() -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = env("HOME").unwrap_or_else(|| PathBuf::from("/root"));
        let (socket, state_dir, config_file) = if nix::unistd::geteuid().is_root() {
            (PathBuf::from(SYSTEM_SOCKET), PathBuf::from("/var/lib/banger"), PathBuf::from("/etc/banger/config.toml"))
        } else {
            let state = env("XDG_STATE_HOME").unwrap_or_else(|| home.join(".local/state")).join("banger");
            let config = env("XDG_CONFIG_HOME").unwrap_or_else(|| home.join(".config"));
            // Never a shared directory such as /tmp: another local user could put a socket there first and
            // receive this user's calls (and the secrets in them). Without a runtime directory the socket
            // lives in the user's own state directory.
            let socket = match env("XDG_RUNTIME_DIR") {
                Some(runtime) => runtime.join("banger/bangerd.sock"),
                None => state.join("bangerd.sock"),
            };
            (socket, state, config.join("banger/config.toml"))
        };
        Defaults {
            socket: env("BANGER_SOCKET").unwrap_or(socket),
            state_dir: env("BANGER_STATE_DIR").unwrap_or(state_dir),
            config_file: env("BANGER_CONFIG").unwrap_or(config_file),
        }
    }

    /// The state directory of the daemon these defaults describe: `BANGER_STATE_DIR`, else the daemon
    /// config file's `state_dir`, else the default. (`banger daemon start` puts the daemon's output there.)
    pub fn daemon_state_dir(&self) -> Result<PathBuf, String> {
        #[derive(serde::Deserialize)]
        struct StateDirOnly {
            state_dir: Option<PathBuf>,
        }
        if std::env::var_os("BANGER_STATE_DIR").is_some_and(|v| !v.is_empty()) {
            return Ok(self.state_dir.clone());
        }
        match std::fs::read_to_string(&self.config_file) {
            Ok(text) => {
                let partial: StateDirOnly =
                    toml::from_str(&text).map_err(|e| format!("cannot read {}: {e}", self.config_file.display()))?;
                Ok(partial.state_dir.unwrap_or_else(|| self.state_dir.clone()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(self.state_dir.clone()),
            Err(e) => Err(format!("cannot read {}: {e}", self.config_file.display())),
        }
    }
}

/// banger's known_hosts of guests' pinned host keys, in the daemon's state directory.
pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    tools_schema::ssh::known_hosts_path(state_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_find_the_system_daemon_first_unless_told_otherwise() {
        let own = PathBuf::from("/run/user/1000/banger/bangerd.sock");
        assert_eq!(Defaults::pick_client_socket(false, true, own.clone()), PathBuf::from(SYSTEM_SOCKET));
        assert_eq!(Defaults::pick_client_socket(false, false, own.clone()), own);
        assert_eq!(Defaults::pick_client_socket(true, true, own.clone()), own, "BANGER_SOCKET wins");
    }

    #[test]
    fn no_default_socket_is_in_a_shared_directory() {
        let d = Defaults::detect();
        assert!(!d.socket.starts_with(std::env::temp_dir()), "{}", d.socket.display());
        assert!(!d.socket.starts_with("/tmp"), "{}", d.socket.display());
    }

    #[test]
    fn the_state_dir_comes_from_the_config_file_unless_the_environment_says() {
        let dir = std::env::temp_dir().join(format!("banger-client-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_file = dir.join("config.toml");
        std::fs::write(&config_file, "state_dir = \"/srv/banger\"\nlog_level = \"debug\"\n[warm]\npool_size = 0\n")
            .unwrap();
        let d = Defaults { socket: dir.join("s"), state_dir: PathBuf::from("/default"), config_file };
        if std::env::var_os("BANGER_STATE_DIR").is_none() {
            assert_eq!(d.daemon_state_dir().unwrap(), PathBuf::from("/srv/banger"));
        }
        let missing = Defaults { config_file: dir.join("none.toml"), ..d };
        assert_eq!(missing.daemon_state_dir().unwrap(), missing.state_dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
