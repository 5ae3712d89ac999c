//! A template's guest RAM as clones get it: a sealed memfd, not the file.
//!
//! A clone maps its template's RAM copy-on-write, so its guest's writes never reach the template. Its VMM's
//! own writes could: QEMU before 8.2 opens a memory-backend file read-write whatever the mapping, so a
//! compromised clone VMM given the file could change the memory every later clone of that template starts
//! from. The daemon therefore copies the file once into a memfd, seals it against every write, resize and
//! further seal change (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`), and hands each clone that
//! descriptor (`mem-path=/proc/self/fd/N`). The kernel then refuses `write`, `fallocate` and shared writable
//! mappings to everyone, root included, while private (copy-on-write) mappings still work, on every QEMU
//! version. The file is never shown to a clone at all.
//!
//! One memfd per template generation, kept while the daemon runs (`forget` drops it with the template); a
//! daemon restart makes it again at the first clone. All-zero pages are left as holes, so the memfd holds only
//! what the guest had written.
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use parking_lot::Mutex;

/// A template's RAM, sealed: safe to give to any number of VMMs.
#[derive(Debug, Clone)]
pub struct SealedRam {
    fd: Arc<OwnedFd>,
    /// The file it was made from (`dev`, `ino`): a different file at the path is sealed again.
    source: (u64, u64),
    pub len: u64,
}

impl SealedRam {
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// How much is copied at a time.
const CHUNK: usize = 1 << 20;
/// The seals every clone's RAM has.
const SEALS: SealFlag = SealFlag::from_bits_truncate(
    SealFlag::F_SEAL_WRITE.bits()
        | SealFlag::F_SEAL_GROW.bits()
        | SealFlag::F_SEAL_SHRINK.bits()
        | SealFlag::F_SEAL_SEAL.bits(),
);

fn cache() -> &'static Mutex<HashMap<PathBuf, SealedRam>> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<PathBuf, SealedRam>>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The sealed copy of the RAM file at `path`, made on first use. Blocking (it may copy the whole file).
pub fn sealed(path: &Path) -> std::io::Result<SealedRam> {
    // The template's VMM had that folder: a link it left at the path is refused rather than followed.
    let file = crate::host_files::open_plain(path)?;
    let meta = file.metadata()?;
    let source = (meta.dev(), meta.ino());
    if let Some(ram) = cache().lock().get(path).filter(|r| r.source == source && r.len == meta.len()) {
        return Ok(ram.clone());
    }
    let ram = seal_copy(&file, source, meta.len())?;
    cache().lock().insert(path.to_path_buf(), ram.clone());
    Ok(ram)
}

/// Drops the sealed copy of a template's RAM (the template is gone); clones running keep theirs mapped.
pub fn forget(path: &Path) {
    cache().lock().remove(path);
}

fn seal_copy(file: &File, source: (u64, u64), len: u64) -> std::io::Result<SealedRam> {
    let fd = memfd_create(c"banger-template-ram", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let ram = File::from(fd);
    ram.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let want = CHUNK.min((len - offset) as usize);
        file.read_exact_at(&mut buf[..want], offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => std::io::Error::new(
                e.kind(),
                format!("the RAM file shrank while it was copied (before {} of {len} bytes)", offset + want as u64),
            ),
            _ => e,
        })?;
        if buf[..want].iter().any(|&b| b != 0) {
            ram.write_all_at(&buf[..want], offset)?;
        }
        offset += want as u64;
    }
    fcntl(&ram, FcntlArg::F_ADD_SEALS(SEALS))?;
    Ok(SealedRam { fd: Arc::new(OwnedFd::from(ram)), source, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// What a compromised clone VMM would try on its template's RAM, each refused by the kernel: write,
    /// punch a hole, truncate, map it shared and writable, reopen it read-write and write, remove the seals.
    /// A private writable mapping (what QEMU makes) works and its writes stay in the mapping.
    #[test]
    fn a_sealed_template_ram_refuses_every_write_but_maps_copy_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mut data = vec![0u8; 3 * CHUNK + 4096];
        data[5] = 7;
        data[2 * CHUNK + 17] = 9;
        std::fs::write(&path, &data).unwrap();
        let ram = sealed(&path).unwrap();
        assert_eq!(ram.len, data.len() as u64);
        let copy = File::from(ram.fd().try_clone_to_owned().unwrap());
        let mut back = vec![0u8; data.len()];
        copy.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "the memfd holds the file's bytes");

        assert!(copy.write_at(b"x", 0).is_err(), "write");
        assert!(copy.set_len(1).is_err(), "shrink");
        assert!(copy.set_len(data.len() as u64 * 2).is_err(), "grow");
        let punch = nix::fcntl::fallocate(
            &copy,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        );
        assert!(punch.is_err(), "punch a hole");
        let through_proc = format!("/proc/self/fd/{}", copy.as_raw_fd());
        let reopened = std::fs::OpenOptions::new().read(true).write(true).open(&through_proc).unwrap();
        assert!(reopened.write_at(b"x", 0).is_err(), "write through a read-write reopen (as QEMU 7.2 opens it)");
        assert!(fcntl(&copy, FcntlArg::F_ADD_SEALS(SealFlag::empty())).is_err(), "seals are sealed");
        // SAFETY: plain mmap calls on a descriptor this test owns; the mapping is unmapped before return.
        unsafe {
            let len = data.len();
            let shared = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                copy.as_raw_fd(),
                0,
            );
            assert_eq!(shared, libc::MAP_FAILED, "a shared writable mapping");
            let private = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                reopened.as_raw_fd(),
                0,
            );
            assert_ne!(private, libc::MAP_FAILED, "a private mapping, as a clone's QEMU makes");
            let bytes = std::slice::from_raw_parts_mut(private as *mut u8, len);
            assert_eq!((bytes[5], bytes[2 * CHUNK + 17]), (7, 9));
            bytes[5] = 1;
            libc::munmap(private, len);
        }
        copy.read_exact_at(&mut back[..8], 0).unwrap();
        assert_eq!(back[5], 7, "the guest's write stayed in its mapping");
        assert_eq!(sealed(&path).unwrap().fd().as_raw_fd(), ram.fd().as_raw_fd(), "one memfd per template");
        forget(&path);
    }

    /// The template's folder was its VMM's: a link left at the RAM file's path is not followed.
    #[test]
    fn a_link_at_the_ram_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"host").unwrap();
        let link = dir.path().join("ram");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(sealed(&link).is_err());
        std::fs::remove_file(&link).unwrap();
        std::fs::hard_link(&victim, &link).unwrap();
        assert!(sealed(&link).is_err());
    }
}
