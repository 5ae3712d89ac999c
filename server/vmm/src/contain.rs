//! How a VM's host processes are contained: its identity (a uid and gid of its own from a range banger owns),
//! its cgroup, and what of the host it may see (`jail`). The drivers turn a `Containment` into a `jail::Jail`
//! for each process they start.
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::cgroup::VmCgroup;
use crate::jail::{Bind, Jail};

/// A VM's containment, decided by the engine and carried in its `BootSpec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containment {
    /// The VM's own uid, and a gid of the same number.
    pub uid: u32,
    /// The group every contained process is in, which may read image and template files.
    pub readers_gid: u32,
    pub cgroup: Option<VmCgroup>,
}

impl Containment {
    pub fn gid(&self) -> u32 {
        self.uid
    }

    /// The jail of one of the VM's processes: the system's read-only folders, the VM's folder (writable),
    /// `files` from outside it (an image's, a template's: each made readable, or writable where the bind
    /// is, by the readers group), `/dev/kvm` where the VMM uses it.
    pub fn jail(&self, vm_id: &str, dir: &Path, files: &[Bind], kvm: bool) -> Result<Jail, std::io::Error> {
        let mut binds = crate::jail::system_binds();
        binds.push(Bind::writable(dir));
        for f in files {
            grant(&f.path, self.readers_gid, if f.writable { 0o060 } else { 0o040 })?;
            binds.push(f.clone());
        }
        let mut groups = vec![self.readers_gid];
        if kvm && Path::new("/dev/kvm").exists() {
            binds.push(Bind::writable("/dev/kvm"));
            groups.push(std::fs::metadata("/dev/kvm")?.gid());
        }
        Ok(Jail {
            uid: self.uid,
            gid: self.gid(),
            groups,
            root: crate::jail::root_for(vm_id),
            binds,
            cgroups: self.cgroup.as_ref().map(|c| c.procs()).unwrap_or_default(),
            finisher: crate::jail::Finisher::Here,
            syscall_filter: false,
        })
    }

    /// The jail Firecracker's jailer finishes (see `jail::Finisher::Jailer`): its root is the jailer's chroot
    /// folder, in which the VM's folder appears writable at its own path and, for a template and its clones,
    /// at the template's `anchor` too (so the paths a snapshot recorded lead each clone to its own files),
    /// and `files` from outside it read-only. The jailer drops every supplementary group, so the readers
    /// group does not reach Firecracker: each file also gets an ACL entry letting the VM's uid read it
    /// (`allow_uid_read`).
    pub fn jailer_jail(
        &self,
        chroot: &Path,
        dir: &Path,
        anchor: Option<&Path>,
        files: &[PathBuf],
    ) -> std::io::Result<Jail> {
        let mut binds = vec![Bind::writable(dir)];
        binds.extend(anchor.map(|a| Bind::writable(dir).seen_at(a)));
        let live = uids_running();
        for f in files {
            grant(f, self.readers_gid, 0o040)?;
            allow_uid_read(f, self.uid, &live)?;
            binds.push(Bind::read_only(f));
        }
        Ok(Jail {
            uid: self.uid,
            gid: self.gid(),
            groups: vec![],
            root: chroot.to_path_buf(),
            binds,
            cgroups: self.cgroup.as_ref().map(|c| c.procs()).unwrap_or_default(),
            finisher: crate::jail::Finisher::Jailer,
            syscall_filter: false,
        })
    }

    /// Gives the VM's folder to its processes without letting them replace what the daemon put there: the
    /// folder is root's with the VM's group and the sticky bit (they may make files, such as their sockets,
    /// and remove only those), and each of `files` (what the VMM opens: disks, logs) is root's with the VM's
    /// group, read-write for it. The daemon's other files there stay its own (0600).
    pub fn prepare_dir(&self, dir: &Path, files: &[PathBuf]) -> std::io::Result<()> {
        chown_group(dir, self.gid())?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))?;
        for f in files {
            let Ok(meta) = std::fs::symlink_metadata(f) else { continue };
            if meta.file_type().is_file() && meta.uid() == 0 {
                chown_group(f, self.gid())?;
                let mode = meta.permissions().mode() & 0o700;
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode | 0o060))?;
            }
        }
        Ok(())
    }
}

/// Undoes `prepare_dir` once the VM's processes are gone: the folder is root's, 0700.
pub fn reclaim_dir(dir: &Path) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Gives `path` the group `gid` and adds `bits` (group bits) to its mode, if not already so.
pub fn grant(path: &Path, gid: u32, bits: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.gid() != gid {
        chown_group(path, gid)?;
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & bits != bits {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))?;
    }
    Ok(())
}

/// The POSIX ACL of a file as Linux stores it in `system.posix_acl_access`: a little-endian version (2),
/// then entries of (tag u16, permissions u16, id u32), sorted by tag and then id.
const ACL_XATTR: &std::ffi::CStr = c"system.posix_acl_access";
const ACL_VERSION: u32 = 2;
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_NO_ID: u32 = u32::MAX;
const ACL_READ: u16 = 4;

/// Adds an entry letting `uid` read `path` to its access ACL (made from its mode if it has none), with the
/// mask widened to let it through. The entry is the read right the readers group already has, for a process
/// that cannot have that group (Firecracker under its jailer). Entries of other uids no process in `live`
/// runs as go at the same time, so a file keeps about one entry per running Firecracker (the caller holds
/// off other launches until its Firecracker runs as its uid: `lib.rs` `FC_GRANTS`).
pub fn allow_uid_read(path: &Path, uid: u32, live: &HashSet<u32>) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: a valid C string; a null buffer of length 0 asks for the size.
    let size = unsafe { libc::getxattr(c.as_ptr(), ACL_XATTR.as_ptr(), std::ptr::null_mut(), 0) };
    let mut buf = vec![0u8; size.max(0) as usize + 64];
    // SAFETY: a valid C string and a buffer of the length given.
    let n = unsafe { libc::getxattr(c.as_ptr(), ACL_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut entries = if n >= 0 {
        parse_acl(&buf[..n as usize]).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{path:?}: an ACL banger cannot read"))
        })?
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(e);
        }
        let mode = std::fs::metadata(path)?.permissions().mode();
        let bits = |shift: u32| ((mode >> shift) & 7) as u16;
        vec![(ACL_USER_OBJ, bits(6), ACL_NO_ID), (ACL_GROUP_OBJ, bits(3), ACL_NO_ID), (ACL_OTHER, bits(0), ACL_NO_ID)]
    };
    let stale = |tag: u16, id: u32| tag == ACL_USER && id != uid && !live.contains(&id);
    if entries.iter().any(|&(tag, perm, id)| tag == ACL_USER && id == uid && perm & ACL_READ != 0)
        && entries.iter().any(|&(tag, perm, _)| tag == ACL_MASK && perm & ACL_READ != 0)
        && !entries.iter().any(|&(tag, _, id)| stale(tag, id))
    {
        return Ok(());
    }
    // Its own entry is written afresh below; stale ones go.
    entries.retain(|&(tag, _, id)| tag != ACL_USER || (id != uid && live.contains(&id)));
    entries.push((ACL_USER, ACL_READ, uid));
    // The mask bounds every named entry and the owning group; without one it is the owning group's bits.
    let group = entries.iter().find(|e| e.0 == ACL_GROUP_OBJ).map(|e| e.1).unwrap_or(0);
    match entries.iter_mut().find(|e| e.0 == ACL_MASK) {
        Some(mask) => mask.1 |= ACL_READ,
        None => entries.push((ACL_MASK, group | ACL_READ, ACL_NO_ID)),
    }
    entries.sort_by_key(|&(tag, _, id)| (tag, id));
    let mut out = ACL_VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    // SAFETY: a valid C string and a buffer of the length given.
    if unsafe { libc::setxattr(c.as_ptr(), ACL_XATTR.as_ptr(), out.as_ptr().cast(), out.len(), 0) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{}: its filesystem has no POSIX ACLs, which Firecracker under its jailer needs to read image \
                     files; keep banger's state directory on ext4, xfs or btrfs (ACLs on)",
                    path.display()
                ),
            ));
        }
        return Err(e);
    }
    Ok(())
}

fn parse_acl(b: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    if b.len() < 4 || u32::from_le_bytes(b[..4].try_into().ok()?) != ACL_VERSION || !(b.len() - 4).is_multiple_of(8) {
        return None;
    }
    b[4..]
        .chunks_exact(8)
        .map(|e| {
            Some((
                u16::from_le_bytes(e[..2].try_into().ok()?),
                u16::from_le_bytes(e[2..4].try_into().ok()?),
                u32::from_le_bytes(e[4..].try_into().ok()?),
            ))
        })
        .collect()
}

fn chown_group(path: &Path, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, None, Some(gid))
}

/// The files a VMM reads through its disks: each drive's qcow2 backing chain (the image's root filesystem,
/// a template's disks), with relative names resolved as QEMU does, at most 8 deep.
pub fn backing_chain(disk: &Path) -> Vec<PathBuf> {
    let mut chain = vec![];
    let mut at = disk.to_path_buf();
    while let Some(next) = crate::qcow2_backing_file(&at) {
        let next = if next.is_absolute() { next } else { at.parent().unwrap_or(Path::new("/")).join(next) };
        if chain.len() >= 8 || chain.contains(&next) {
            break;
        }
        chain.push(next.clone());
        at = next;
    }
    chain
}

/// Hands out VM uids from `[base + 1, base + count]` (`base` itself is the readers group). A uid is in use
/// while a process runs as it (the kernel's process table is the record, so VMs adopted after a daemon restart
/// keep theirs) or for a short while after it was handed out, until the VM's first process runs as it.
pub struct Ids {
    pub base: u32,
    pub count: u32,
    handed_out: Mutex<HashMap<u32, Instant>>,
}

const HANDED_OUT_FOR: Duration = Duration::from_secs(120);

impl Ids {
    pub fn new(base: u32, count: u32) -> Ids {
        Ids { base, count, handed_out: Mutex::new(HashMap::new()) }
    }

    pub fn readers_gid(&self) -> u32 {
        self.base
    }

    pub fn contains(&self, uid: u32) -> bool {
        uid > self.base && uid - self.base <= self.count
    }

    /// The lowest uid of the range that is free now and not in `held` (the uids the store gives VMs).
    pub fn allocate(&self, held: &HashSet<u32>) -> Option<u32> {
        let running = self.running();
        let mut handed = self.handed_out.lock();
        handed.retain(|_, at| at.elapsed() < HANDED_OUT_FOR);
        let uid = (self.base + 1..=self.base.saturating_add(self.count))
            .find(|u| !running.contains(u) && !handed.contains_key(u) && !held.contains(u))?;
        handed.insert(uid, Instant::now());
        Some(uid)
    }

    /// Whether some process runs as `uid` now.
    pub fn in_use(&self, uid: u32) -> bool {
        self.running().contains(&uid)
    }

    /// Lets a uid go at once (its VM's processes are gone).
    pub fn release(&self, uid: u32) {
        self.handed_out.lock().remove(&uid);
    }

    /// Uids of the range some process runs as.
    fn running(&self) -> HashSet<u32> {
        uids_running().into_iter().filter(|u| self.contains(*u)).collect()
    }
}

/// The uids live processes run as (the kernel's process table; zombies hold none).
pub fn uids_running() -> HashSet<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Default::default() };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(crate::host::process_uid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_handed_out_once_until_released() {
        let ids = Ids::new(1_950_000_000, 4);
        let none = HashSet::new();
        let a = ids.allocate(&none).unwrap();
        let b = ids.allocate(&none).unwrap();
        assert_ne!(a, b);
        assert!(ids.contains(a) && ids.contains(b) && !ids.contains(ids.readers_gid()));
        // A uid the store gives a stopped VM is not handed out.
        let held: HashSet<u32> = [1_950_000_003].into();
        let c = ids.allocate(&held).unwrap();
        assert_eq!(c, 1_950_000_004);
        assert_eq!(ids.allocate(&held), None, "the range is used up");
        ids.release(b);
        assert_eq!(ids.allocate(&held), Some(b));
        assert_eq!([a, b, c].iter().min(), Some(&1_950_000_001));
    }
}

#[cfg(test)]
mod jailed {
    use super::*;

    fn read_as(path: &Path, uid: u32) -> bool {
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            // Only this thread takes the uid (raw syscalls: glibc's would change every thread).
            // SAFETY: plain system calls on this thread's credentials.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
            std::fs::read(&path).is_ok()
        })
        .join()
        .unwrap()
    }

    /// The cgroup's memory limit, attacked: a contained process that allocates past it is killed by the
    /// kernel (its cgroup's OOM killer, not the host's), and this process, outside the cgroup, carries on.
    #[test]
    fn a_process_that_allocates_past_its_limit_is_killed_and_the_host_holds() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let h = match crate::cgroup::Hierarchy::detect() {
            Ok(h) => h,
            Err(e) => panic!("this host has no cgroups for the test: {e}"),
        };
        let id = format!("oom-test-{}", std::process::id());
        let limits = crate::cgroup::Limits { memory_bytes: 64 << 20, cpu_quota_us: 100_000, cpu_weight: 100, pids: 64 };
        let cgroup = h.create(&id, limits).unwrap();
        let c = Containment { uid: 1_900_065_301, readers_gid: 1_900_000_000, cgroup: Some(cgroup.clone()) };
        let dir = tempfile::tempdir().unwrap();
        let jail = c.jail(&id, dir.path(), &[], false).unwrap();
        let out = std::fs::File::create(dir.path().join("out")).unwrap();
        // 256 MiB, touched page by page, under a 64 MiB limit.
        let args = ["-c".into(), "x = bytearray(256 << 20); print('allocated')".into()];
        let pid = crate::jail::spawn(
            &jail,
            &crate::jail::Program {
                binary: Path::new("/usr/bin/python3"),
                args: &args,
                env: &[],
                output: &out,
                fds: &[],
            },
        )
        .unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
        let said = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let _ = std::fs::remove_dir(crate::jail::root_for(&id));
        cgroup.remove();
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)),
            "{status:?}: {said}"
        );
        assert!(!said.contains("allocated"), "{said}");
    }

    /// What Firecracker gets under its jailer, which drops the readers group: its uid alone may read the
    /// image file it was given, once the ACL says so; the mode's group bits stay the readers group's.
    #[test]
    fn a_uid_read_entry_lets_that_uid_alone_read() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let image = dir.path().join("vmlinux");
        std::fs::write(&image, "kernel").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o400)).unwrap();
        grant(&image, 1_900_000_000, 0o040).unwrap();
        let (fc, other) = (1_900_065_201, 1_900_065_202);
        assert!(!read_as(&image, fc), "no read before the entry");
        let nobody_runs = HashSet::new();
        allow_uid_read(&image, other, &nobody_runs).unwrap();
        allow_uid_read(&image, fc, &nobody_runs).unwrap();
        allow_uid_read(&image, fc, &nobody_runs).unwrap();
        assert!(read_as(&image, fc), "its uid reads");
        assert!(!read_as(&image, other), "another uid does not");
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.gid()), (0o440, 1_900_000_000));
        let mut buf = vec![0u8; 256];
        let c = std::ffi::CString::new(image.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string and a buffer of the length given.
        let n = unsafe { libc::getxattr(c.as_ptr(), ACL_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let entries = parse_acl(&buf[..n as usize]).unwrap();
        // One entry however often it is added, and the entry of a uid no process runs as went with it.
        let named: Vec<u32> = entries.iter().filter(|e| e.0 == ACL_USER).map(|e| e.2).collect();
        assert_eq!(named, [fc], "{entries:?}");
        // A uid some process runs as keeps its entry.
        allow_uid_read(&image, other, &[fc].into()).unwrap();
        assert!(read_as(&image, fc) && read_as(&image, other), "both entries kept");
    }

    /// A contained process writes the files the daemon gave its VM's folder, makes its own there, and can
    /// neither remove nor replace the daemon's, nor read the daemon's other files.
    #[test]
    fn a_vm_process_writes_its_files_but_cannot_replace_the_daemons() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("vms").join("v1");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        crate::host_files::create_private(&log).unwrap();
        std::fs::write(dir.join("secret"), "daemon's").unwrap();
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let image = state.path().join("images").join("rootfs");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, "image\n").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o400)).unwrap();
        let c = Containment { uid: 1_900_000_321, readers_gid: 1_900_000_000, cgroup: None };
        // The daemon's umask, which the jail must not pass on to the folders of its new root.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        c.prepare_dir(&dir, std::slice::from_ref(&log)).unwrap();
        let jail = c.jail("test-v1", &dir, &[Bind::read_only(&image)], false).unwrap();
        let out = std::fs::File::create(state.path().join("out")).unwrap();
        let script = format!(
            "echo line >> {log}; echo own > {dir}/sock && echo made-own; cat {image}; \
             cat {dir}/secret 2>/dev/null || echo secret-unreadable; rm -f {log} 2>/dev/null; \
             test -e {log} && echo log-kept",
            log = log.display(),
            dir = dir.display(),
            image = image.display()
        );
        let args = ["-c".into(), script.into()];
        let pid = crate::jail::spawn(
            &jail,
            &crate::jail::Program { binary: Path::new("/bin/sh"), args: &args, env: &[], output: &out, fds: &[] },
        )
        .unwrap();
        nix::sys::stat::umask(old);
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
        let _ = std::fs::remove_dir(crate::jail::root_for("test-v1"));
        let said = std::fs::read_to_string(state.path().join("out")).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "line\n", "{said}");
        for want in ["made-own", "image", "secret-unreadable", "log-kept"] {
            assert!(said.lines().any(|l| l == want), "{want} missing from:\n{said}");
        }
    }
}
