//! The managed `Host *.vm` block in the user's `~/.ssh/config`, so plain `ssh <name>.vm` works with banger's
//! key. The block is written at the top of the file (ssh takes the first value it finds for an option, so
//! it wins for `*.vm` whatever the rest says), everything outside the markers is preserved byte for byte,
//! and the file is replaced atomically with its mode and owner kept.
//!
//! Host keys are pinned: the block says `StrictHostKeyChecking yes` with banger's own known_hosts file
//! (`<state>/ssh/known_hosts`), whose entries (`<name>.vm` and the VM's address) the daemon writes from keys
//! each VM's agent reports over its guest channel, never from the network, where another guest could answer
//! in the VM's place. A VM's entries go when it is deleted, and a new key for a name or address replaces
//! the old one.
use parking_lot::Mutex;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const BEGIN: &str = "# >>> banger: managed block for *.vm hosts (edits inside are overwritten) >>>";
pub const END: &str = "# <<< banger <<<";

#[derive(Debug, thiserror::Error)]
pub enum SshConfigError {
    #[error("{path} has a banger block start marker without its end marker; fix the file by hand")]
    Malformed { path: String },
    #[error("updating {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn render(identity: &Path, known_hosts: &Path) -> String {
    let mut block = format!("{BEGIN}\nHost *.vm\n");
    for (option, value) in tools_schema::ssh::client_options(identity, known_hosts) {
        block.push_str(&format!("    {option} {value}\n"));
    }
    block.push_str(END);
    block.push('\n');
    block
}

/// banger's known_hosts file, for the managed block and `banger vm ssh`.
pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    tools_schema::ssh::known_hosts_path(state_dir)
}

/// Whether a host key is pinned for `<name>.vm` at `ip` (one entry names both).
pub fn is_pinned(path: &Path, name: &str, ip: Ipv4Addr) -> bool {
    let (host, ip) = (format!("{name}.vm"), ip.to_string());
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    text.lines().any(|l| {
        let names: Vec<&str> = l.split(' ').next().unwrap_or("").split(',').collect();
        names.contains(&host.as_str()) && names.contains(&ip.as_str())
    })
}

/// Puts the current block into `path`, creating the file (and `~/.ssh`) if needed. Returns whether the
/// file changed.
pub fn sync(path: &Path, identity: &Path, known_hosts: &Path) -> Result<bool, SshConfigError> {
    let io_err = |source| SshConfigError::Io { path: path.display().to_string(), source };
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let rest = strip_block(existing.as_deref().unwrap_or(""))
        .ok_or_else(|| SshConfigError::Malformed { path: path.display().to_string() })?;
    let mut content = render(identity, known_hosts);
    if !rest.trim().is_empty() {
        content.push('\n');
        content.push_str(rest.trim_start_matches('\n'));
    }
    if existing.as_deref() == Some(content.as_str()) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    let meta = std::fs::metadata(path).ok();
    let tmp = dir.join(format!(".{}.banger-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("config")));
    let mut f = std::fs::File::create(&tmp).map_err(io_err)?;
    f.write_all(content.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    let mode = meta.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0o600);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    if let Some(m) = &meta {
        let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
    } else if let Ok(owner) = std::fs::metadata(dir) {
        // A new file belongs to whoever owns ~/.ssh, not to the daemon.
        let _ = std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()));
    }
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(true)
}

/// The file without banger's block; `None` if a block is opened and never closed.
fn strip_block(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == BEGIN {
            inside = true;
        } else if trimmed == END && inside {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    (!inside).then_some(out)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostKeyError {
    #[error("the SSH host key is longer than {max} bytes", max = tools_schema::guest::SSH_HOST_KEY_MAX_BYTES)]
    TooLong,
    #[error("the SSH host key is not one `TYPE BASE64` line")]
    NotOneLine,
    #[error("the SSH host key type `{0}` is not one banger accepts")]
    Type(String),
    #[error("the SSH host key's data is not base64 of a `{0}` key")]
    Data(String),
}

/// Key types sshd may offer; anything else from a guest is refused.
const HOST_KEY_TYPES: &[&str] =
    &["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa"];

/// A guest-reported public key line, checked and reduced to `TYPE BASE64` (its comment, guest text that
/// would end up in a host file, is dropped). The base64 must decode to a key blob that names the same type.
pub fn parse_host_key(line: &str) -> Result<String, HostKeyError> {
    use base64::Engine as _;
    if line.len() > tools_schema::guest::SSH_HOST_KEY_MAX_BYTES {
        return Err(HostKeyError::TooLong);
    }
    let line = line.strip_suffix('\n').unwrap_or(line);
    if line.chars().any(|c| c.is_control()) {
        return Err(HostKeyError::NotOneLine);
    }
    let mut fields = line.split(' ');
    let (Some(kind), Some(data)) = (fields.next(), fields.next()) else { return Err(HostKeyError::NotOneLine) };
    if !HOST_KEY_TYPES.contains(&kind) {
        return Err(HostKeyError::Type(kind.chars().take(40).collect()));
    }
    let blob =
        base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| HostKeyError::Data(kind.to_string()))?;
    // The blob starts with the type as an SSH string: u32 length, then the name.
    let named = blob.get(..4).map(|n| u32::from_be_bytes(n.try_into().unwrap()) as usize);
    if named != Some(kind.len()) || blob.get(4..4 + kind.len()) != Some(kind.as_bytes()) || blob.len() <= 4 + kind.len()
    {
        return Err(HostKeyError::Data(kind.to_string()));
    }
    Ok(format!("{kind} {data}"))
}

/// One writer at a time for the known_hosts file (VMs boot in parallel).
static KNOWN_HOSTS: Mutex<()> = Mutex::new(());

/// Pins `key` (from `parse_host_key`) for `<name>.vm` and `ip`, replacing any entry for either.
pub fn pin_host_key(path: &Path, name: &str, ip: Option<Ipv4Addr>, key: &str) -> std::io::Result<()> {
    let host = format!("{name}.vm");
    let hosts = match ip {
        Some(ip) => format!("{host},{ip}"),
        None => host.clone(),
    };
    let ip = ip.map(|i| i.to_string());
    rewrite_known_hosts(
        path,
        |names| names.iter().any(|n| *n == host || Some(n.as_str()) == ip.as_deref()),
        Some(format!("{hosts} {key}")),
    )
}

/// Removes the entries for `<name>.vm` and `ip` (the VM is gone).
pub fn forget_host_key(path: &Path, name: &str, ip: Option<Ipv4Addr>) -> std::io::Result<()> {
    let host = format!("{name}.vm");
    let ip = ip.map(|i| i.to_string());
    rewrite_known_hosts(path, |names| names.iter().any(|n| *n == host || Some(n.as_str()) == ip.as_deref()), None)
}

/// Keeps only entries whose names and addresses all belong to one of `vms` (name, address): run at daemon
/// start, so entries of VMs deleted while the daemon was down cannot vouch for a successor.
pub fn retain_host_keys(path: &Path, vms: &[(String, Option<Ipv4Addr>)]) -> std::io::Result<()> {
    let stale = |names: &[String]| {
        !vms.iter().any(|(name, ip)| {
            let host = format!("{name}.vm");
            let ip = ip.map(|i| i.to_string());
            names.iter().all(|n| *n == host || Some(n.as_str()) == ip.as_deref())
        })
    };
    if !path.exists() {
        return Ok(());
    }
    rewrite_known_hosts(path, stale, None)
}

/// Rewrites the known_hosts file without the lines `drop` picks (by their host names), plus `add`:
/// a fresh file, created exclusively and never through a link, renamed over the old one.
fn rewrite_known_hosts(path: &Path, drop: impl Fn(&[String]) -> bool, add: Option<String>) -> std::io::Result<()> {
    let _held = KNOWN_HOSTS.lock();
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut out = String::new();
    for line in existing.lines() {
        let names: Vec<String> = line.split(' ').next().unwrap_or("").split(',').map(str::to_string).collect();
        if !line.trim().is_empty() && !drop(&names) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(line) = add {
        out.push_str(&line);
        out.push('\n');
    }
    if out == existing && path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!(".known_hosts.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(out.as_bytes())?;
    f.sync_all()?;
    // Like every state file, the daemon's alone (whoever may ssh into guests has the root-only key anyway).
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_file_private_with_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ssh/config");
        assert!(sync(&path, Path::new("/keys/id"), Path::new("/kh")).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, render(Path::new("/keys/id"), Path::new("/kh")));
        assert!(text.contains("Host *.vm") && text.contains("IdentityFile /keys/id"));
        assert!(text.contains("StrictHostKeyChecking yes") && text.contains("UserKnownHostsFile /kh"), "{text}");
        assert!(!text.contains("/dev/null") && !text.contains("StrictHostKeyChecking no"));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn preserves_everything_else_and_replaces_an_old_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let user = "Host work\n    HostName work.example\n    User me\n\nMatch host *.internal\n    ForwardAgent no";
        std::fs::write(&path, user).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        sync(&path, Path::new("/old/key"), Path::new("/kh")).unwrap();
        assert!(sync(&path, Path::new("/new/key"), Path::new("/kh")).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(BEGIN), "block goes first so it takes precedence");
        assert_eq!(text.matches(BEGIN).count(), 1);
        assert!(!text.contains("/old/key"));
        assert!(text.ends_with(user), "user content kept byte for byte: {text:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640, "mode kept");
        assert!(!sync(&path, Path::new("/new/key"), Path::new("/kh")).unwrap(), "an up-to-date file is not rewritten");
    }

    #[test]
    fn a_block_without_its_end_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let broken = format!("Host a\n{BEGIN}\nHost *.vm\n");
        std::fs::write(&path, &broken).unwrap();
        assert!(matches!(sync(&path, Path::new("/k"), Path::new("/kh")), Err(SshConfigError::Malformed { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
    }

    /// A real key line as ssh-keygen writes it.
    fn real_key() -> String {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@guest", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read_to_string(key.with_extension("pub")).unwrap()
    }

    #[test]
    fn host_keys_from_guests_are_checked_and_lose_their_comment() {
        let line = real_key();
        let parsed = parse_host_key(&line).unwrap();
        assert!(parsed.starts_with("ssh-ed25519 AAAA") && !parsed.contains("root@guest"), "{parsed}");
        let data = parsed.split(' ').nth(1).unwrap();
        assert_eq!(
            parse_host_key(&format!("ssh-ed25519 {data}\nsneaky.vm ssh-ed25519 {data}")),
            Err(HostKeyError::NotOneLine)
        );
        assert_eq!(parse_host_key(&format!("ssh-ed25519 {data} \x1b]52;c;aGk=\x07")), Err(HostKeyError::NotOneLine));
        assert_eq!(parse_host_key("ssh-ed25519"), Err(HostKeyError::NotOneLine));
        assert!(matches!(parse_host_key(&format!("ssh-dss {data}")), Err(HostKeyError::Type(_))));
        assert!(matches!(parse_host_key(&format!("ssh-rsa {data}")), Err(HostKeyError::Data(_))), "blob names ed25519");
        assert!(matches!(parse_host_key("ssh-ed25519 not-base64!"), Err(HostKeyError::Data(_))));
        assert!(
            matches!(parse_host_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"), Err(HostKeyError::Data(_))),
            "no key data"
        );
        let huge = format!("ssh-ed25519 {data} {}", "x".repeat(tools_schema::guest::SSH_HOST_KEY_MAX_BYTES));
        assert_eq!(parse_host_key(&huge), Err(HostKeyError::TooLong));
    }

    #[test]
    fn pins_replace_by_name_or_address_and_deleted_vms_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh/known_hosts");
        let ip = |n| Some(Ipv4Addr::new(10, 0, 0, n));
        pin_host_key(&path, "a", ip(2), "ssh-ed25519 AAAA1").unwrap();
        pin_host_key(&path, "b", ip(3), "ssh-ed25519 BBBB1").unwrap();
        pin_host_key(&path, "a", ip(2), "ssh-ed25519 AAAA2").unwrap(); // recreated: new key
        pin_host_key(&path, "c", ip(3), "ssh-ed25519 CCCC1").unwrap(); // b's address, reused
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "a.vm,10.0.0.2 ssh-ed25519 AAAA2\nc.vm,10.0.0.3 ssh-ed25519 CCCC1\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        forget_host_key(&path, "a", ip(2)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c.vm,10.0.0.3 ssh-ed25519 CCCC1\n");
        pin_host_key(&path, "d", ip(4), "ssh-ed25519 DDDD1").unwrap();
        retain_host_keys(&path, &[("c".into(), ip(3)), ("d".into(), ip(9))]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c.vm,10.0.0.3 ssh-ed25519 CCCC1\n", "d's address moved");
    }

    #[test]
    fn the_known_hosts_file_is_never_written_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".known_hosts.{}.tmp", std::process::id())))
            .unwrap();
        pin_host_key(&path, "a", None, "ssh-ed25519 AAAA1").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a.vm ssh-ed25519 AAAA1\n");
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    }
}
