//! Firecracker's own jailer: the command line that starts Firecracker through it (chroot, uid/gid drop,
//! cgroups, a new PID namespace, optionally a network namespace; Firecracker's built-in seccomp filters stay
//! on), and where the jail's files are. Firecracker cannot boot guests on the hosts banger is tested on, so
//! its launch does not go through here yet; `tests/fc_jailer.rs` runs the real jailer with these arguments up
//! to a Firecracker answering on its API socket inside the chroot, as the contained uid.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cgroup::Limits;

/// The API socket, as Firecracker sees it inside its chroot.
pub const API_SOCKET_IN_JAIL: &str = "/run/firecracker.socket";

#[derive(Debug, Clone)]
pub struct JailerSpec<'a> {
    /// The VM's id (alphanumerics and hyphens, at most 64: the jailer's rule, checked here first).
    pub id: &'a str,
    pub firecracker: &'a Path,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: &'a Path,
    pub cgroup_version: u8,
    /// The daemon's cgroup under which the VM's is made (`--parent-cgroup`).
    pub parent_cgroup: &'a str,
    pub limits: Limits,
    /// A network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<&'a Path>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("`{0}` cannot be a jailer id: alphanumerics and hyphens, 1 to 64 of them")]
    BadId(String),
    #[error("the jailer refuses an exec file whose name lacks `firecracker`: {0}")]
    BadExecFile(PathBuf),
    #[error("the jailer never runs Firecracker as root (uid or gid 0)")]
    Root,
}

impl JailerSpec<'_> {
    /// The jailer's arguments: its own, then `--`, then Firecracker's.
    pub fn args(&self) -> Result<Vec<OsString>, JailerError> {
        if self.id.is_empty() || self.id.len() > 64 || !self.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(JailerError::BadId(self.id.to_string()));
        }
        if !self.firecracker.file_name().is_some_and(|n| n.to_string_lossy().contains("firecracker")) {
            return Err(JailerError::BadExecFile(self.firecracker.to_path_buf()));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(JailerError::Root);
        }
        let mut a: Vec<OsString> = vec![];
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.into());
        push("--exec-file", self.firecracker.into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--chroot-base-dir", self.chroot_base.into());
        push("--cgroup-version", self.cgroup_version.to_string().into());
        push("--parent-cgroup", self.parent_cgroup.into());
        let l = self.limits;
        let cgroups: Vec<String> = match self.cgroup_version {
            1 => vec![
                format!("memory.limit_in_bytes={}", l.memory_bytes),
                format!("cpu.cfs_period_us={}", crate::cgroup::CPU_PERIOD_US),
                format!("cpu.cfs_quota_us={}", l.cpu_quota_us),
                format!("pids.max={}", l.pids),
            ],
            _ => vec![
                format!("memory.max={}", l.memory_bytes),
                format!("cpu.max={} {}", l.cpu_quota_us, crate::cgroup::CPU_PERIOD_US),
                format!("pids.max={}", l.pids),
            ],
        };
        for c in cgroups {
            push("--cgroup", c.into());
        }
        if let Some(ns) = self.netns {
            push("--netns", ns.into());
        }
        a.push("--new-pid-ns".into());
        a.push("--".into());
        a.push("--api-sock".into());
        a.push(API_SOCKET_IN_JAIL.into());
        Ok(a)
    }

    /// The jail's root on the host: `<chroot base>/<exec file name>/<id>/root`. The kernel and disks are
    /// hard-linked (or bind-mounted) in here; Firecracker sees `/` as this folder.
    pub fn root(&self) -> PathBuf {
        let exec = self.firecracker.file_name().map(PathBuf::from).unwrap_or_default();
        self.chroot_base.join(exec).join(self.id).join("root")
    }

    /// Where the API socket is on the host.
    pub fn api_socket(&self) -> PathBuf {
        self.root().join(API_SOCKET_IN_JAIL.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(id: &'a str, fc: &'a Path, version: u8) -> JailerSpec<'a> {
        JailerSpec {
            id,
            firecracker: fc,
            uid: 1_900_000_005,
            gid: 1_900_000_005,
            chroot_base: Path::new("/var/lib/banger/jailer"),
            cgroup_version: version,
            parent_cgroup: "banger",
            limits: Limits::for_shape(2, 512),
            netns: None,
        }
    }

    #[test]
    fn jailer_arguments_carry_identity_limits_and_namespaces() {
        let fc = Path::new("/opt/bin/firecracker");
        let args: Vec<String> =
            spec("vm-1", fc, 1).args().unwrap().into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("--id vm-1 --exec-file /opt/bin/firecracker --uid 1900000005 --gid 1900000005"));
        assert!(joined.contains("--cgroup-version 1 --parent-cgroup banger"));
        assert!(joined.contains(&format!("--cgroup memory.limit_in_bytes={}", (512u64 + 256) << 20)));
        assert!(joined.contains("--cgroup cpu.cfs_quota_us=250000") && joined.contains("--cgroup pids.max=512"));
        assert!(joined.ends_with("--new-pid-ns -- --api-sock /run/firecracker.socket"), "{joined}");
        let v2: Vec<String> =
            spec("vm-1", fc, 2).args().unwrap().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert!(v2.iter().any(|a| a == "cpu.max=250000 100000"), "{v2:?}");
        assert_eq!(
            spec("vm-1", fc, 1).api_socket(),
            Path::new("/var/lib/banger/jailer/firecracker/vm-1/root/run/firecracker.socket")
        );
        assert!(matches!(spec("a/b", fc, 1).args(), Err(JailerError::BadId(_))));
        assert!(matches!(spec("ok", Path::new("/bin/qemu"), 1).args(), Err(JailerError::BadExecFile(_))));
        assert!(matches!(JailerSpec { uid: 0, ..spec("ok", fc, 1) }.args(), Err(JailerError::Root)));
    }
}
