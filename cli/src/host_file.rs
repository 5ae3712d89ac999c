//! Host files the CLI writes with bytes that came from a guest (`vm cp` out of a VM, `workspace export
//! --output`). The guest is hostile, so nothing it says decides how the host file is made:
//! - the file is written under an unpredictable temporary name in the destination's own directory, created
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` (a symlink or file planted there is never followed or reused), readable only
//!   by the user while it is incomplete, and renamed over the destination only when whole;
//! - a guest-reported mode keeps only its permission bits (never setuid, setgid or sticky) and passes through
//!   the user's umask, as `cp` without `-p` does.
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The permission bits a guest may ask for: read, write and execute for owner, group and others.
const GUEST_MODE_BITS: u32 = 0o777;

/// A file being written beside its destination; removed on drop unless `commit` renamed it into place.
pub struct NewFile {
    file: File,
    tmp: PathBuf,
    dst: PathBuf,
    committed: bool,
}

/// Starts writing `dst`: a fresh temporary file in `dst`'s directory, mode 0600 until `commit`.
pub fn create_beside(dst: &Path) -> std::io::Result<NewFile> {
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    // A name someone guessed and took only costs a retry: O_EXCL never opens what is already there.
    for _ in 0..16 {
        let tmp = dir.join(format!(".{base}.banger-part-{}", random_suffix()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok(NewFile { file, tmp, dst: dst.to_path_buf(), committed: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("could not create a temporary file in {}", dir.display()),
    ))
}

impl NewFile {
    pub fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(data)
    }

    /// Syncs the file, gives it `mode` (from `safe_mode`; never more than 0777) and renames it over the
    /// destination.
    pub fn commit(mut self, mode: u32) -> std::io::Result<()> {
        let mode = mode & GUEST_MODE_BITS;
        self.file.sync_all()?;
        // fchmod on the open file: the name could have been swapped since it was created.
        self.file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&self.tmp, &self.dst)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The mode a host file gets from a mode someone else (a guest) reported: its permission bits only, less the
/// process's umask. `None` (no or unparsable mode) is 0666 less the umask, like any new file.
pub fn safe_mode(reported: Option<&str>) -> u32 {
    let asked = reported.and_then(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8).ok()).unwrap_or(0o666);
    asked & GUEST_MODE_BITS & !current_umask()
}

/// The process's umask, read without changing it (`Umask:` in /proc/self/status, Linux 4.7+); 022 if unknown.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn random_suffix() -> String {
    let mut b = [0u8; 12];
    // getrandom(2) never fails for so few bytes once the pool is initialised; fall back to time and pid.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_modes_lose_setuid_setgid_sticky_and_the_umask() {
        let umask = current_umask();
        assert_eq!(safe_mode(Some("4755")), 0o755 & !umask);
        assert_eq!(safe_mode(Some("7777")), 0o777 & !umask);
        assert_eq!(safe_mode(Some("2711")), 0o711 & !umask);
        assert_eq!(safe_mode(Some("garbage")), 0o666 & !umask);
        assert_eq!(safe_mode(None), 0o666 & !umask);
    }

    #[test]
    fn a_symlink_at_any_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let dst = dir.path().join("out");
        // The old predictable name, planted.
        std::os::unix::fs::symlink(&victim, dir.path().join("out.banger-part")).unwrap();
        let mut f = create_beside(&dst).unwrap();
        f.write_all(b"new").unwrap();
        f.commit(0o4755).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&dst).unwrap().mode() & 0o7000, 0, "no setuid even when asked directly");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), "new");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 3, "victim, out and the planted link: no temporary left: {left:?}");
    }

    #[test]
    fn an_abandoned_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = create_beside(&dir.path().join("out")).unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
