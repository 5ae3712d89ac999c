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

/// Opens `path` for writing, creating it 0600 if missing (never following a symlink there).
pub fn create_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// `create_private`, appending: a log that outlives each process writing to it.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
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
