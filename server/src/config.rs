//! Daemon configuration: a TOML file plus defaults derived from who runs the daemon.
//!
//! As root the daemon is a system service: state in `/var/lib/banger`, socket `/run/banger/bangerd.sock`,
//! config `/etc/banger/config.toml`. As any other user it follows XDG: `$XDG_STATE_HOME/banger`,
//! `$XDG_RUNTIME_DIR/banger/bangerd.sock`, `$XDG_CONFIG_HOME/banger/config.toml`.
//! `BANGER_SOCKET`, `BANGER_STATE_DIR` and `BANGER_CONFIG` override them (the tests use these to run
//! isolated daemons).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tools_schema::daemon::VmmKind;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket the daemon listens on.
    pub socket: PathBuf,
    /// Database, VM disks, logs, runtime sockets.
    pub state_dir: PathBuf,
    /// Besides the socket owner (and root), members of this group may use the daemon.
    pub socket_group: Option<String>,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing env-filter directive.
    pub log_level: String,
    /// Log format on stderr: `json` or `text`. The log file is always JSON.
    pub log_format: String,
    /// Force a VMM for new VMs instead of detecting what the host supports.
    pub vmm: Option<VmmKind>,
    /// Where binaries the daemon runs are looked up first (then PATH).
    pub bin_dirs: Vec<PathBuf>,
    /// Default shape of new VMs.
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    /// Seconds a graceful stop may take before the VM is forced off.
    pub stop_grace_secs: u64,
    /// Most bytes one VM's exec spool (`<vm dir>/exec-output/`) holds; output beyond it is cut, and the cut
    /// is reported (`total_bytes` of vm.exec_output below the command's `stdout_bytes`).
    pub exec_spool_mib: u64,
    /// Seconds a boot may take before it is declared failed.
    pub boot_timeout_secs: u64,
    pub network: NetworkConfig,
    /// The ssh client config that gets banger's managed `Host *.vm` block (default `~/.ssh/config` of the
    /// daemon's user). `manage_ssh_config = false` leaves it alone.
    pub ssh_config: Option<PathBuf>,
    pub manage_ssh_config: bool,
    /// Private key for guests (its `.pub` next to it goes into each guest's authorized_keys). Default: a
    /// managed key in the state directory, generated on first use.
    pub ssh_key: Option<PathBuf>,
    /// Guest channel of QEMU VMs: `virtio-serial` (default; survives snapshot restore) or `vsock`
    /// (vhost-device-vsock, the same hybrid-vsock protocol Firecracker speaks).
    pub qemu_channel: tools_schema::boot::ChannelKind,
    /// Disk layout of new QEMU VMs: `qcow2` (default: qcow2 overlays of the image's root filesystem and work
    /// seed) or `overlay`, Firecracker's (the image's root filesystem raw and read-only, an overlayfs upper
    /// disk, a raw work disk; the agent builds the root as PID 1), so that layout runs on hosts where
    /// Firecracker cannot (banger's tests use it). Overlay-layout VMs always boot cold (no warm templates).
    pub qemu_root_layout: crate::vmm::RootLayout,
    /// Let `--vmm firecracker` start on hosts without hardware KVM. Guests cannot boot there (paravirtual
    /// KVM kills ordinary kernels), so this only exercises the driver, e.g. in banger's own tests.
    pub allow_firecracker_without_hardware_kvm: bool,
    /// Build cache shared by image builds (recipe root filesystems) and host set-up (kernels, VMM binaries).
    /// Default `$BANGER_CACHE`, else `/var/cache/banger`.
    pub cache_dir: PathBuf,
    /// Image recipes (`<name>/recipe.sh`) and `assemble.sh`. Default: the `images/` folder banger was built
    /// from, else `/usr/local/share/banger/images`.
    pub recipes_dir: Option<PathBuf>,
    /// The static `banger-agent` binary put into built images. Default: next to `bangerd`, else on PATH.
    pub agent_binary: Option<PathBuf>,
    /// Guest kernel for images built from recipes (QEMU boots `kernel`, Firecracker `kernel_elf`; an `initrd`
    /// only for kernels that need one). Default: banger's lean kernel (`<cache_dir>/kernel/lean/vmlinux`, no
    /// initramfs), which scripts/setup-host.sh builds. The Debian cloud kernel set-up also unpacks is the
    /// fallback: kernel = `<cache_dir>/kernel/default/vmlinuz`, kernel_elf = `.../vmlinux`, initrd =
    /// `.../initramfs.cpio.gz`.
    pub kernel: Option<PathBuf>,
    pub kernel_elf: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub guest_sync: GuestSyncConfig,
    pub web: WebConfig,
    pub warm: WarmConfig,
    pub limits: LimitsConfig,
    pub containment: ContainmentConfig,
}

/// How much the daemon takes on (engine/admission.rs): memory promised to VMs, and boots at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory all VMs together may be promised (running, being created or started, pooled), as a multiple of
    /// the host's MemTotal. Above 1 overcommits: idle guests touch little of theirs and clones share their
    /// template's pages, but a host whose guests use it all meets the OOM killer. A create past it is refused.
    pub memory_overcommit_ratio: f64,
    /// An absolute cap (MiB) on the same, when it is lower than the ratio's; none by default.
    pub memory_mib: Option<u64>,
    /// Creates, starts and pool refills that boot at once; more wait their turn in a FIFO queue.
    /// 0 (the default) means the host's CPU count, at least 2.
    pub max_concurrent_creates: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { memory_overcommit_ratio: 1.0, memory_mib: None, max_concurrent_creates: 0 }
    }
}

/// How each VM's host processes are contained (`engine/contain.rs`, `banger_vmm::jail`): a uid of its own,
/// no capabilities, its own mount and PID namespaces, QEMU's seccomp sandbox, a cgroup with its limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainmentConfig {
    /// On by default. Off only to debug a VMM: its processes then run as root, unconfined (doctor warns).
    pub enabled: bool,
    /// VM uids are `uid_base + 1 ..= uid_base + uid_count`; `uid_base` itself is the group that may read
    /// images and templates. No account of the host may use these ids.
    pub uid_base: u32,
    pub uid_count: u32,
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        ContainmentConfig { enabled: true, uid_base: 1_900_000_000, uid_count: 65_536 }
    }
}

/// Warm starts (engine/warm/): VMs restored from per-image template snapshots instead of booted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmConfig {
    /// Restore new VMs from a template when one matches the image and shape (QEMU, virtio-serial channel).
    pub templates: bool,
    /// After a cold boot that found no usable template, build one in the background.
    pub auto_build: bool,
    /// Restored VMs of the default image kept ready (in the default shape), handed out by `vm create` at once.
    /// One by default: under software emulation a restore alone is ~0.2 of a cold boot, a pooled VM ~0.04.
    pub pool_size: u32,
    /// The same for other images, by name: `pools = { agent = 2 }`.
    pub pools: std::collections::BTreeMap<String, u32>,
    /// The pool is refilled only while the host keeps at least this much memory available (MiB) on top
    /// of the new VM's.
    pub pool_reserve_mib: u64,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            templates: true,
            auto_build: true,
            pool_size: 1,
            pools: Default::default(),
            pool_reserve_mib: 2048,
        }
    }
}

/// The localhost web console (front/web.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the console at all.
    pub enabled: bool,
    /// Loopback address and port (`127.0.0.1:7878`; port 0 picks a free one). Other addresses are refused:
    /// the console is for the user at this machine, never for the network.
    pub listen: std::net::SocketAddr,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig { enabled: true, listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7878)) }
    }
}

/// What the daemon copies into every guest each time it boots. Nothing of it is ever baked into an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestSyncConfig {
    /// Whose files are copied. Default: the home of `$SUDO_USER` when the daemon was started with sudo, else
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// Set `user.name` and `user.email` in the guest's global git config from the host's, so plain shells in
    /// the guest can commit.
    pub git_identity: bool,
    /// Host files (relative to `home`, or absolute) copied to guest paths with mode 0600 at every boot. A
    /// missing host file is skipped with a warning, leaving whatever the guest has.
    pub auth_files: Vec<SyncedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncedFile {
    pub host: PathBuf,
    pub guest: String,
}

impl Default for GuestSyncConfig {
    fn default() -> Self {
        let file = |host: &str, guest: &str| SyncedFile { host: host.into(), guest: guest.into() };
        GuestSyncConfig {
            home: None,
            git_identity: true,
            auth_files: vec![
                // Claude Code, opencode and pi keep their logins here on Linux.
                file(".claude/.credentials.json", "/root/.claude/.credentials.json"),
                file(".local/share/opencode/auth.json", "/root/.local/share/opencode/auth.json"),
                file(".pi/agent/auth.json", "/root/.pi/agent/auth.json"),
            ],
        }
    }
}

impl GuestSyncConfig {
    /// The home folder host files are read from.
    pub fn home(&self) -> PathBuf {
        if let Some(h) = &self.home {
            return h.clone();
        }
        let sudo_home = std::env::var("SUDO_USER")
            .ok()
            .and_then(|u| nix::unistd::User::from_name(&u).ok().flatten())
            .map(|u| u.dir);
        sudo_home
            .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/root"))
    }

    pub fn host_path(&self, f: &SyncedFile) -> PathBuf {
        if f.host.is_absolute() {
            f.host.clone()
        } else {
            self.home().join(&f.host)
        }
    }
}

/// The VM network: one bridge, the host as gateway, guests numbered from the subnet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Give VMs a network at all. Without it guests are still managed (the guest channel needs no network).
    pub enabled: bool,
    /// Bridge name (created if missing).
    pub bridge: String,
    /// IPv4 subnet of the bridge; the host takes the first address, guests the rest.
    pub subnet: String,
    /// Idle TAP devices kept ready so a boot does not wait for one.
    pub tap_pool: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { enabled: true, bridge: "banger0".into(), subnet: "10.254.77.0/24".into(), tap_pool: 2 }
    }
}

impl NetworkConfig {
    pub fn subnet(&self) -> Result<ipnetwork::Ipv4Network, ConfigError> {
        let net: ipnetwork::Ipv4Network =
            self.subnet.parse().map_err(|e| ConfigError::Invalid(format!("network.subnet `{}`: {e}", self.subnet)))?;
        if net.prefix() > 29 || net.prefix() < 16 {
            return Err(ConfigError::Invalid(format!("network.subnet `{}` must be between /16 and /29", self.subnet)));
        }
        if net.network() != net.ip() {
            return Err(ConfigError::Invalid(format!(
                "network.subnet `{}` has host bits set; use {}/{}",
                self.subnet,
                net.network(),
                net.prefix()
            )));
        }
        Ok(net)
    }
}

impl Default for Config {
    fn default() -> Self {
        let d = Defaults::detect();
        Config {
            socket: d.socket,
            state_dir: d.state_dir,
            socket_group: None,
            log_level: "info".into(),
            log_format: "json".into(),
            vmm: None,
            // Where scripts/setup-host.sh installs Firecracker, jailer and vhost-device-vsock.
            bin_dirs: vec![default_cache_dir().join("bin")],
            default_vcpus: 1,
            default_memory_mib: 512,
            stop_grace_secs: 10,
            exec_spool_mib: 2048,
            // Software-emulated guests boot in seconds, but a loaded CI host can be slow.
            boot_timeout_secs: 120,
            network: NetworkConfig::default(),
            ssh_config: None,
            manage_ssh_config: true,
            ssh_key: None,
            qemu_channel: tools_schema::boot::ChannelKind::VirtioSerial,
            qemu_root_layout: crate::vmm::RootLayout::Qcow2,
            allow_firecracker_without_hardware_kvm: false,
            cache_dir: default_cache_dir(),
            recipes_dir: None,
            agent_binary: None,
            kernel: None,
            kernel_elf: None,
            initrd: None,
            guest_sync: GuestSyncConfig::default(),
            web: WebConfig::default(),
            warm: WarmConfig::default(),
            limits: LimitsConfig::default(),
            containment: ContainmentConfig::default(),
        }
    }
}

fn default_cache_dir() -> PathBuf {
    banger_vmm::host::cache_dir()
}

// Where a client finds the daemon, and the daemon's default paths: defined once, in the client crate.
pub use banger_client::paths::{Defaults, SYSTEM_SOCKET};

impl Config {
    /// Loads the config file if it exists (a missing default file is fine; a missing explicit one is not).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let defaults = Defaults::detect();
        let path = explicit.map(Path::to_path_buf).unwrap_or(defaults.config_file);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|source| ConfigError::Parse { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => Config::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        // Environment overrides beat the file, so a test can point one daemon at its own directory.
        if let Some(s) = std::env::var_os("BANGER_SOCKET").filter(|v| !v.is_empty()) {
            config.socket = s.into();
        }
        if let Some(s) = std::env::var_os("BANGER_STATE_DIR").filter(|v| !v.is_empty()) {
            config.state_dir = s.into();
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.socket.is_absolute() || !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid("socket and state_dir must be absolute paths".into()));
        }
        if !["json", "text"].contains(&self.log_format.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "log_format must be `json` or `text`, not `{}`",
                self.log_format
            )));
        }
        let probe = tools_schema::vm::VmCreateParams {
            vcpus: Some(self.default_vcpus),
            memory_mib: Some(self.default_memory_mib),
            ..Default::default()
        };
        probe.validate().map_err(|e| ConfigError::Invalid(format!("default VM shape: {e}")))?;
        self.network.subnet()?;
        if self.network.bridge.is_empty() || self.network.bridge.len() > 15 {
            return Err(ConfigError::Invalid("network.bridge must be 1-15 characters".into()));
        }
        if !self.web.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "web.listen `{}` is not a loopback address; the console serves only this machine: use \
                 127.0.0.1:PORT or [::1]:PORT (reach it remotely through an SSH tunnel)",
                self.web.listen
            )));
        }
        let c = &self.containment;
        if c.uid_base < 65_536 || c.uid_count == 0 || c.uid_base.checked_add(c.uid_count).is_none() {
            return Err(ConfigError::Invalid(format!(
                "containment.uid_base {} / uid_count {}: the range must start at 65536 or above (no account's \
                 ids), hold at least one uid and end below 2^32",
                c.uid_base, c.uid_count
            )));
        }
        let ratio = self.limits.memory_overcommit_ratio;
        if !(ratio.is_finite() && ratio > 0.0 && ratio <= 100.0) {
            return Err(ConfigError::Invalid(format!(
                "limits.memory_overcommit_ratio must be above 0 and at most 100, not {ratio}"
            )));
        }
        if self.limits.memory_mib == Some(0) {
            return Err(ConfigError::Invalid("limits.memory_mib must be above 0 (leave it out for no cap)".into()));
        }
        for f in &self.guest_sync.auth_files {
            if !f.guest.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "guest_sync.auth_files: guest path `{}` must be absolute",
                    f.guest
                )));
            }
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    /// The SSH key banger puts into guests (`vm ssh`, and `ssh <name>.vm` via the config block): the
    /// configured `ssh_key`, else a managed ed25519 key generated on first use.
    pub fn ssh_key(&self) -> PathBuf {
        self.ssh_key.clone().unwrap_or_else(|| self.state_dir.join("ssh/id_ed25519"))
    }

    pub fn ssh_config_path(&self) -> PathBuf {
        self.ssh_config.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".ssh/config")
        })
    }

    /// The web console's login token (0600), generated at the daemon's first start.
    pub fn web_token_file(&self) -> PathBuf {
        self.state_dir.join("web-token")
    }

    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }

    pub fn recipes_dir(&self) -> PathBuf {
        self.recipes_dir.clone().unwrap_or_else(|| {
            let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
            if source_tree.join("assemble.sh").is_file() {
                source_tree
            } else {
                PathBuf::from("/usr/local/share/banger/images")
            }
        })
    }

    /// The guest agent binary for image builds, if one can be found.
    pub fn agent_binary(&self) -> Option<PathBuf> {
        if let Some(p) = &self.agent_binary {
            return Some(p.clone());
        }
        let sibling = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("banger-agent")));
        sibling.filter(|p| is_executable(p)).or_else(|| self.find_binary("banger-agent"))
    }

    /// Kernel, ELF kernel and initramfs for recipe builds: as configured, else set-up's lean kernel (one ELF
    /// for both VMMs, no initramfs).
    pub fn build_kernel(&self) -> (PathBuf, PathBuf, Option<PathBuf>) {
        match &self.kernel {
            Some(k) => (k.clone(), self.kernel_elf.clone().unwrap_or_else(|| k.clone()), self.initrd.clone()),
            None => {
                let lean = self.cache_dir.join("kernel/lean/vmlinux");
                (lean.clone(), self.kernel_elf.clone().unwrap_or(lean), self.initrd.clone())
            }
        }
    }

    /// Finds an executable in `bin_dirs`, then in PATH.
    pub fn find_binary(&self, name: &str) -> Option<PathBuf> {
        self.tools().find(name)
    }

    /// Where the VMM drivers find host programs.
    pub fn tools(&self) -> crate::vmm::Tools {
        crate::vmm::Tools { bin_dirs: self.bin_dirs.clone() }
    }
}

impl crate::vmm::FindBinary for Config {
    fn find_binary(&self, name: &str) -> Option<PathBuf> {
        Config::find_binary(self, name)
    }
}

pub(crate) use crate::vmm::is_executable;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_qemu_channel_is_refused_naming_the_choices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "qemu_channel = \"serial\"\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err();
        let why = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
        assert!(why.contains("qemu_channel") && why.contains("`virtio-serial`") && why.contains("`vsock`"), "{why}");
        std::fs::write(&path, "qemu_channel = \"vsock\"\n").unwrap();
        assert_eq!(Config::load(Some(&path)).unwrap().qemu_channel, tools_schema::boot::ChannelKind::Vsock);
    }
}
