//! What the daemon copies into a guest every time it boots: the host user's git identity and the coding
//! agents' logins (Claude Code, opencode, pi). Never baked into an image; refreshed at each start, so a new
//! login on the host reaches a guest at its next start. Failures here never fail a boot: each is a warning.
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::guest::GuestConn;

/// Logins are secrets: only root in the guest may read them.
const AUTH_MODE: u32 = 0o600;
/// Host login files larger than this are not logins: refuse rather than copy something unexpected.
const MAX_AUTH_FILE: u64 = 1 << 20;
/// The guest's global git config, where the host's identity goes (what `git config --global` writes).
const GUEST_GITCONFIG: &str = "/root/.gitconfig";
/// A guest git config larger than this is left alone: the host reads no more of a guest's file than this.
const MAX_GUEST_GITCONFIG: u64 = 256 << 10;

/// What one sync did, for the log and for tests.
#[derive(Debug, Default)]
pub(crate) struct SyncReport {
    pub copied: Vec<String>,
    pub warnings: Vec<String>,
}

impl Engine {
    pub(crate) async fn sync_into_guest(&self, vm: &str, conn: &GuestConn) -> SyncReport {
        let sync = &self.cfg.guest_sync;
        let mut report = SyncReport::default();
        for f in &sync.auth_files {
            let host = sync.host_path(f);
            match read_small(&host) {
                Ok(Some(data)) => {
                    match conn.write_file(&f.guest, Some(AUTH_MODE), false, &data, &CancellationToken::new()).await {
                        Ok(_) => report.copied.push(f.guest.clone()),
                        Err(e) => report.warnings.push(format!("could not write {} in the guest: {e}", f.guest)),
                    }
                }
                // Missing on the host: skip, leaving whatever the guest already has.
                Ok(None) => report.warnings.push(format!("skipped {}: {} does not exist", f.guest, host.display())),
                Err(e) => report.warnings.push(format!("skipped {}: cannot read {}: {e}", f.guest, host.display())),
            }
        }
        if sync.git_identity {
            if let Some(identity) = host_git_identity(&sync.home()).await {
                match sync_git_identity(conn, &identity).await {
                    Ok(()) => report.copied.extend(identity.keys().map(|(key, _)| format!("git user.{key}"))),
                    Err(e) => report.warnings.push(e),
                }
            }
        }
        for w in &report.warnings {
            tracing::warn!(vm, "guest sync: {w}");
        }
        tracing::info!(vm, copied = ?report.copied, "synced identity and logins into the guest");
        report
    }
}

fn read_small(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
        Ok(m) if m.len() > MAX_AUTH_FILE => {
            Err(std::io::Error::other(format!("{} bytes is too large for a login file", m.len())))
        }
        Ok(_) => std::fs::read(path).map(Some),
    }
}

/// The host user's `user.name` and `user.email`, as far as they are set.
pub(crate) struct GitIdentity {
    name: Option<String>,
    email: Option<String>,
}

async fn host_git_identity(home: &Path) -> Option<GitIdentity> {
    let (name, email) = tokio::join!(host_git_config(home, "user.name"), host_git_config(home, "user.email"));
    // A value with a line break cannot be one git config line; such an identity is not copied.
    let clean = |v: Option<String>| v.filter(|v| !v.chars().any(|c| c.is_control()));
    let identity = GitIdentity { name: clean(name), email: clean(email) };
    (identity.name.is_some() || identity.email.is_some()).then_some(identity)
}

/// Puts the host's identity into the guest's global git config by editing the file on the host and writing
/// it back through the agent, instead of running `git config` in the guest: under emulation each process a
/// guest spawns costs ~100 ms, and two of them were most of what every create spent after the guest was
/// ready. The guest's file is untrusted: read with a cap, edited as text, and written only into the guest.
impl GitIdentity {
    fn keys(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [("name", &self.name), ("email", &self.email)].into_iter().filter_map(|(k, v)| Some((k, v.as_deref()?)))
    }
}

async fn sync_git_identity(conn: &GuestConn, identity: &GitIdentity) -> Result<(), String> {
    let cancel = CancellationToken::new();
    // A file the agent cannot read (most often: none yet) is written afresh.
    let current = match conn.read_file(GUEST_GITCONFIG, 0, MAX_GUEST_GITCONFIG + 1, &cancel).await {
        Ok((data, size, _)) if size > MAX_GUEST_GITCONFIG || data.len() as u64 > MAX_GUEST_GITCONFIG => {
            return Err(format!("left {GUEST_GITCONFIG} alone: {size} bytes is more than a git config holds"));
        }
        Ok((data, _, _)) => match String::from_utf8(data) {
            Ok(text) => text,
            Err(_) => return Err(format!("left {GUEST_GITCONFIG} alone: it is not UTF-8")),
        },
        Err(crate::guest::GuestError::Agent { .. }) => String::new(),
        Err(e) => return Err(format!("cannot read {GUEST_GITCONFIG} in the guest: {e}")),
    };
    let edited = set_git_identity(&current, identity);
    if edited == current {
        return Ok(());
    }
    conn.write_file(GUEST_GITCONFIG, None, false, edited.as_bytes(), &cancel)
        .await
        .map(|_| ())
        .map_err(|e| format!("could not write {GUEST_GITCONFIG} in the guest: {e}"))
}

/// `text` (a git config file) with `user.name` and `user.email` set as `identity` has them: every existing
/// value of such a key in a `[user]` section is removed and one goes first into the first `[user]` section
/// (appended when there is none). Everything else is kept byte for byte, continuation lines included.
fn set_git_identity(text: &str, identity: &GitIdentity) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let ours: String = identity.keys().map(|(key, value)| format!("\t{key} = {}\n", quote(value))).collect();
    let mut out = String::with_capacity(text.len() + ours.len() + 8);
    let (mut in_user, mut inserted, mut continued, mut dropping) = (false, false, false, false);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        // A line after one ending in an odd number of backslashes continues that value.
        let continues = body.len() - body.trim_end_matches('\\').len();
        let was_continued = std::mem::replace(&mut continued, continues % 2 == 1);
        if was_continued {
            if !dropping {
                out.push_str(line);
            }
            continue;
        }
        dropping = false;
        let trimmed = body.trim_start();
        if trimmed.starts_with(['#', ';']) {
            continued = false; // a comment never continues
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            let section = header.split(']').next().unwrap_or_default();
            in_user = section.trim().eq_ignore_ascii_case("user");
            let rest = header.split_once(']').map(|(_, r)| r.trim()).unwrap_or_default();
            if in_user && !inserted && (rest.is_empty() || rest.starts_with(['#', ';'])) {
                out.push_str(line);
                if !line.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&ours);
                inserted = true;
                continue;
            }
        } else if in_user && !trimmed.starts_with(['#', ';']) {
            let key = trimmed.split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or_default();
            if identity.keys().any(|(ours, _)| key.eq_ignore_ascii_case(ours)) {
                dropping = true;
                continue;
            }
        }
        out.push_str(line);
    }
    if !inserted {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("[user]\n");
        out.push_str(&ours);
    }
    out
}

/// A value from the host user's global git config (`~/.gitconfig`, then `~/.config/git/config`).
pub(crate) async fn host_git_config(home: &Path, key: &str) -> Option<String> {
    for file in [home.join(".gitconfig"), home.join(".config/git/config")] {
        if !file.is_file() {
            continue;
        }
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new("git").arg("config").arg("--file").arg(&file).args(["--get", key]).output(),
        )
        .await
        .ok()?
        .ok()?;
        let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !value.is_empty() {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> GitIdentity {
        GitIdentity { name: Some("Ada \"A\" O'Lovelace \\ Jr".into()), email: Some("ada@example.com".into()) }
    }

    const OURS: &str = "\tname = \"Ada \\\"A\\\" O'Lovelace \\\\ Jr\"\n\temail = \"ada@example.com\"\n";

    #[test]
    fn an_empty_config_gets_a_user_section() {
        assert_eq!(set_git_identity("", &ada()), format!("[user]\n{OURS}"));
        assert_eq!(
            set_git_identity("[core]\n\tpager = less", &ada()),
            format!("[core]\n\tpager = less\n[user]\n{OURS}")
        );
    }

    #[test]
    fn old_values_go_and_everything_else_stays() {
        let text = "# mine\n[user]\n\tname = Old\n\tsigningkey = K\n\tEMAIL = old@x \\\n  continued\n[alias]\n\tco = checkout\n[User]\n  name=Again\n[user \"sub\"]\n\tname = kept\n";
        let want = format!(
            "# mine\n[user]\n{OURS}\tsigningkey = K\n[alias]\n\tco = checkout\n[User]\n[user \"sub\"]\n\tname = kept\n"
        );
        assert_eq!(set_git_identity(text, &ada()), want);
        // Applying it again changes nothing, so a restart writes nothing.
        assert_eq!(set_git_identity(&want, &ada()), want);
    }

    #[test]
    fn a_key_the_host_lacks_is_left_as_the_guest_has_it() {
        let only_email = GitIdentity { name: None, email: Some("e@x".into()) };
        let text = "[user]\n\tname = Guest\n\temail = old@x\n";
        assert_eq!(set_git_identity(text, &only_email), "[user]\n\temail = \"e@x\"\n\tname = Guest\n");
    }

    #[test]
    fn a_continued_value_that_looks_like_a_section_is_not_one() {
        let text = "[alias]\n\tx = a \\\n[user]\n";
        assert_eq!(set_git_identity(text, &ada()), format!("{text}[user]\n{OURS}"));
    }

    /// What the edit produced is what git reads back, quotes and backslashes included.
    #[test]
    fn git_reads_the_identity_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, set_git_identity("[user]\n\tname = Old\n", &ada())).unwrap();
        let get = |key: &str| {
            let out = std::process::Command::new("git")
                .arg("config")
                .arg("--file")
                .arg(&file)
                .args(["--get", key])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(get("user.name"), "Ada \"A\" O'Lovelace \\ Jr\n");
        assert_eq!(get("user.email"), "ada@example.com\n");
    }
}
