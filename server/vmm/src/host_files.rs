//! Files the daemon makes on the host hold guests' disks, sessions' secrets and logs: they are its own
//! alone. The daemon's umask (`daemon::prepare_state_dir`) already makes every new file 0600 and directory
//! 0700; these helpers say so explicitly where a file is made, so no later umask change opens one up.
use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of the daemon's files: disks, database, logs, locks.
pub const PRIVATE_FILE: u32 = 0o600;
/// Image files: the daemon's, and read-only (every VM's overlay depends on the base never changing).
pub const IMAGE_FILE: u32 = 0o400;

/// How the daemon opens each of its own files for writing: 0600 when made, never through a symlink.
fn private_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(PRIVATE_FILE).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// Opens `path` for writing, creating it 0600 if missing (never following a symlink there).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    private_options().create(true).truncate(false).open(path)
}

/// A new file of the daemon's at `path`, 0600, in a folder a VMM may write to (a VM's or template's): whatever
/// is at the path is removed first (a VMM could have put its own file or a link there, which the daemon
/// would then write through), and the file is made exclusively, never through a symlink.
pub fn create_fresh(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    private_options().create_new(true).open(path)
}

/// `create_fresh` with `bytes` in it: the one way the daemon writes a small file (a pid file, a template's
/// metadata, a marker) into a folder a VMM can write to.
pub fn write_fresh(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_fresh(path)?.write_all(bytes)
}

/// Opens, read-only, a file in a folder a VMM could write to, only if it is a plain file with one name (not a
/// symlink, not a second name of another file); non-blocking, so a FIFO put there cannot hold the daemon.
pub fn open_plain(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a plain file of its own (a link?): refused", path.display()),
        ));
    }
    Ok(f)
}

/// Takes over a file a VMM made for the daemon (a Firecracker snapshot): it must be a plain file with one
/// name (not a symlink, not a hard link to something else), and becomes root's, 0600. Done on the open
/// descriptor, so the VMM cannot swap the path between the check and the change; opened non-blocking, so a
/// FIFO put there cannot hold the daemon's thread.
pub fn take_over(path: &Path) -> std::io::Result<()> {
    let f = open_plain(path)?;
    std::os::unix::fs::fchown(&f, Some(0), Some(0))?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))
}

/// `create_private`, appending: a log that outlives each process writing to it.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    private_options().append(true).create(true).open(path)
}

/// Gives a file the daemon made through a child process (qemu-img, mkfs, cp) its private mode.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_FILE))
}

/// The last `max` bytes of a file (nothing if it does not exist): the one way to read a log a guest or a VMM
/// wrote, whatever its size.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut data = vec![];
    f.take(max).read_to_end(&mut data)?;
    Ok(data)
}

/// The last `lines` non-blank lines of a log, read from at most its last `max` bytes.
pub fn log_tail(path: &Path, lines: usize, max: u64) -> String {
    let text = String::from_utf8_lossy(&read_tail(path, max).unwrap_or_default()).into_owned();
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// What a VMM can leave in its writable folder for the daemon to write through: a symlink to a file of
    /// the host's, or a file of its own. The daemon's new file replaces either; the host's file is untouched.
    #[test]
    fn a_fresh_file_never_writes_through_what_a_vmm_left_there() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "host's").unwrap();
        let state = dir.path().join("state");
        std::os::unix::fs::symlink(&victim, &state).unwrap();
        use std::io::Write;
        create_fresh(&state).unwrap().write_all(b"daemon's").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host's");
        let meta = std::fs::symlink_metadata(&state).unwrap();
        assert!(meta.file_type().is_file() && meta.mode() & 0o777 == PRIVATE_FILE, "{meta:?}");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "daemon's");
    }

    /// A snapshot the VMM made is taken over only as a plain file of its own: a symlink or a second name of
    /// another file is refused, and the target keeps its mode.
    #[test]
    fn only_a_plain_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "host's").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("state");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(take_over(&link).is_err(), "a symlink");
        let hard = dir.path().join("ram");
        std::fs::hard_link(&victim, &hard).unwrap();
        assert!(take_over(&hard).is_err(), "a hard link");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o644, "the target is untouched");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(take_over(&fifo).is_err(), "a FIFO is refused, not waited on");
        let own = dir.path().join("own");
        std::fs::write(&own, "snapshot").unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o666)).unwrap();
        take_over(&own).unwrap();
        let meta = std::fs::metadata(&own).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, PRIVATE_FILE));
    }
}
