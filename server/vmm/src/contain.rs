//! How a VM's host processes are contained: its identity (a uid and gid of its own from a range banger owns),
//! its cgroup, and what of the host it may see (`jail`). The drivers turn a `Containment` into a `jail::Jail`
//! for each process they start.
use std::collections::HashMap;
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

    /// The lowest uid of the range that is free now.
    pub fn allocate(&self) -> Option<u32> {
        let running = self.running();
        let mut handed = self.handed_out.lock();
        handed.retain(|_, at| at.elapsed() < HANDED_OUT_FOR);
        let uid = (self.base + 1..=self.base.saturating_add(self.count))
            .find(|u| !running.contains(u) && !handed.contains_key(u))?;
        handed.insert(uid, Instant::now());
        Some(uid)
    }

    /// Lets a uid go at once (its VM's processes are gone).
    pub fn release(&self, uid: u32) {
        self.handed_out.lock().remove(&uid);
    }

    /// Uids of the range some process runs as.
    fn running(&self) -> std::collections::HashSet<u32> {
        let Ok(procs) = std::fs::read_dir("/proc") else { return Default::default() };
        procs
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
            .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
            .filter(|u| self.contains(*u))
            .collect()
    }
}

/// The uid a process runs as (from /proc), to report a VM's identity as the kernel sees it.
pub fn process_uid(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_handed_out_once_until_released() {
        let ids = Ids::new(1_950_000_000, 3);
        let a = ids.allocate().unwrap();
        let b = ids.allocate().unwrap();
        assert_ne!(a, b);
        assert!(ids.contains(a) && ids.contains(b) && !ids.contains(ids.readers_gid()));
        let c = ids.allocate().unwrap();
        assert_eq!(ids.allocate(), None, "the range is used up");
        ids.release(b);
        assert_eq!(ids.allocate(), Some(b));
        assert_eq!([a, b, c].iter().min(), Some(&1_950_000_001));
    }
}

#[cfg(test)]
mod jailed {
    use super::*;

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
