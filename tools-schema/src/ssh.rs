//! How a host reaches a guest over SSH, defined once: the options banger's managed `Host *.vm` block
//! (`server/src/ssh_config.rs`) writes and `banger vm ssh` passes, and where the pinned host keys live.
use std::path::{Path, PathBuf};

/// banger's known_hosts file (host keys learned over guest channels), inside the daemon's state directory.
pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh/known_hosts")
}

/// The ssh client options for a banger guest, as `(option, value)`: root with banger's managed key only,
/// and host keys checked strictly against banger's own known_hosts, so a guest answering at another VM's
/// address fails host-key verification.
pub fn client_options(identity: &Path, known_hosts: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("User", "root".into()),
        ("IdentityFile", identity.display().to_string()),
        ("IdentitiesOnly", "yes".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("UserKnownHostsFile", known_hosts.display().to_string()),
        ("LogLevel", "ERROR".into()),
        ("ConnectTimeout", "10".into()),
    ]
}
