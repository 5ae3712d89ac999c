//! What the daemon copies into a guest every time it boots: the host user's git identity and the coding
//! agents' logins (Claude Code, opencode, pi). Never baked into an image; refreshed at each start, so a new
//! login on the host reaches a guest at its next start. Failures here never fail a boot: each is a warning.
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tools_schema::guest::ExecSpec;

use super::Engine;
use crate::guest::GuestConn;

/// Logins are secrets: only root in the guest may read them.
const AUTH_MODE: u32 = 0o600;
/// Host login files larger than this are not logins: refuse rather than copy something unexpected.
const MAX_AUTH_FILE: u64 = 1 << 20;

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
            let home = sync.home();
            for key in ["user.name", "user.email"] {
                let Some(value) = host_git_config(&home, key).await else {
                    continue;
                };
                // argv, not a shell line: names with quotes or spaces need no escaping.
                let spec = ExecSpec {
                    argv: ["git", "config", "--global", key, &value].map(String::from).to_vec(),
                    env: [("HOME".to_string(), "/root".to_string())].into(),
                    cwd: None,
                    stdin: false,
                    timeout_ms: Some(10_000),
                };
                match conn.exec(spec, None, 4096, &CancellationToken::new()).await {
                    Ok(out) if out.status.code == Some(0) => report.copied.push(format!("git {key}")),
                    Ok(out) => report.warnings.push(format!(
                        "git config {key} failed in the guest: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => report.warnings.push(format!("git config {key} in the guest: {e}")),
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
