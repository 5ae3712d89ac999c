//! Firecracker's own jailer: the command line that starts Firecracker through it, and where its chroot is.
//!
//! The jailer chroots (pivot_root in a mount namespace of its own) into `<base>/firecracker/<id>/root`, makes
//! the device nodes Firecracker needs there (owned by the VM's uid), drops to the VM's uid and gid (and every
//! supplementary group) and execs Firecracker, whose built-in seccomp filters stay on. The daemon does the
//! rest before the jailer runs (`jail::Finisher::Jailer`): the jailer's PID namespace (so no `--new-pid-ns`,
//! whose extra fork would make Firecracker nobody's child), the VM's cgroups, which the daemon manages for
//! both VMMs alike (so no `--cgroup`: one place sets, reads, changes and removes limits), NoNewPrivs, and a
//! tmpfs at the chroot with the VM's files bound in. The TAP stays in the daemon's network namespace, on the
//! bridge (so no `--netns`).
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct JailerSpec<'a> {
    /// The jail's id, which Firecracker also gets as `--id` (alphanumerics and hyphens, at most 64: the
    /// jailer's rule, checked here first). The VM's process marker, so the daemon finds the process again.
    pub id: &'a str,
    pub firecracker: &'a Path,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: &'a Path,
    /// The API socket, as Firecracker sees it inside its chroot.
    pub api_socket: &'a Path,
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
        for (k, v) in [
            ("--id", OsString::from(self.id)),
            ("--exec-file", self.firecracker.into()),
            ("--uid", self.uid.to_string().into()),
            ("--gid", self.gid.to_string().into()),
            ("--chroot-base-dir", self.chroot_base.into()),
        ] {
            a.push(k.into());
            a.push(v);
        }
        a.extend(["--".into(), "--api-sock".into(), self.api_socket.into()]);
        Ok(a)
    }

    /// The jail's root on the host: `<chroot base>/<exec file name>/<id>/root`. Firecracker sees `/` as this
    /// folder.
    pub fn root(&self) -> PathBuf {
        let exec = self.firecracker.file_name().map(PathBuf::from).unwrap_or_default();
        self.chroot_base.join(exec).join(self.id).join("root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(id: &'a str, fc: &'a Path) -> JailerSpec<'a> {
        JailerSpec {
            id,
            firecracker: fc,
            uid: 1_900_000_005,
            gid: 1_900_000_005,
            chroot_base: Path::new("/run/banger-jails/vm-1"),
            api_socket: Path::new("/var/lib/banger/vms/vm-1/firecracker.sock"),
        }
    }

    #[test]
    fn jailer_arguments_carry_identity_and_the_chroot() {
        let fc = Path::new("/opt/bin/firecracker");
        let args: Vec<String> =
            spec("vm-1", fc).args().unwrap().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args.join(" "),
            "--id vm-1 --exec-file /opt/bin/firecracker --uid 1900000005 --gid 1900000005 \
             --chroot-base-dir /run/banger-jails/vm-1 -- --api-sock /var/lib/banger/vms/vm-1/firecracker.sock"
        );
        assert_eq!(spec("vm-1", fc).root(), Path::new("/run/banger-jails/vm-1/firecracker/vm-1/root"));
        assert!(matches!(spec("a/b", fc).args(), Err(JailerError::BadId(_))));
        assert!(matches!(spec("ok", Path::new("/bin/qemu")).args(), Err(JailerError::BadExecFile(_))));
        assert!(matches!(JailerSpec { uid: 0, ..spec("ok", fc) }.args(), Err(JailerError::Root)));
    }
}
