//! Facts about the host the drivers need: what kind of KVM it has, how QEMU accelerates guests on it, its
//! TSC frequency, and whether a pid is still a given VM's process.
use std::path::{Path, PathBuf};

use tools_schema::daemon::Acceleration;

/// Classifies the host's virtualisation. `/dev/kvm` alone proves nothing: the paravirtual `kvm_pvm`
/// module provides it too, and ordinary guest kernels die on it mid-boot.
pub fn acceleration() -> Acceleration {
    let kvm_dev = Path::new("/dev/kvm").exists();
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_flag = cpu_flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if kvm_dev && (module("kvm_intel") || module("kvm_amd")) && hw_flag {
        Acceleration::HardwareKvm
    } else if kvm_dev {
        Acceleration::ParavirtKvm
    } else {
        Acceleration::None
    }
}

/// How QEMU runs guests on a host like this: with KVM on hardware KVM, else software emulation.
pub fn qemu_accel(accel: Acceleration) -> tools_schema::daemon::QemuAccel {
    use tools_schema::daemon::QemuAccel;
    if accel == Acceleration::HardwareKvm {
        QemuAccel::Kvm
    } else {
        QemuAccel::Tcg
    }
}

/// The host TSC frequency in kHz. Software-emulated guests need it on their command line
/// (`tsc_early_khz`), or most TCG boots hang calibrating the timer.
pub fn tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse() {
            return Some(v);
        }
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Whether a process is alive and its command line contains `marker` (guards against pid reuse).
pub fn process_matches(pid: u32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains(marker) && !is_zombie(pid)
        }
        Err(_) => false,
    }
}

/// A line of /proc/PID/status: what follows `name:`, trimmed.
pub fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

/// The real uid a live process runs as, from its status (not the owner of /proc/PID, which a process that
/// makes itself non-dumpable hands to root); `None` for a zombie, which holds nothing but its pid.
pub fn process_uid(pid: u32) -> Option<u32> {
    if is_zombie(pid) {
        return None;
    }
    status_field(pid, "Uid")?.split_whitespace().next()?.parse().ok()
}

/// A process that has exited and awaits its parent's wait.
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Where banger's host set-up keeps kernels, images and programs: `$BANGER_CACHE`, else /var/cache/banger.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BANGER_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/banger".into())
}

/// Connects to a socket a VM's process listens on in the VM's folder (its channel, QMP, vsock or API socket).
/// The VMM may replace what it made there, with a link to another VM's socket or to a host service's, so the
/// listener must be of the folder's group: the VM's own gid (the folder is root's, so the VMM cannot change
/// that), or root's where containment is off. Checked on the connected socket (SO_PEERCRED), so a swap after
/// the check changes nothing.
pub async fn connect_vm_socket(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::unix::fs::MetadataExt;
    let stream = tokio::net::UnixStream::connect(path).await?;
    let peer = stream.peer_cred()?;
    let folder = path.parent().unwrap_or(Path::new("/"));
    let want = std::fs::metadata(folder)?.gid();
    if peer.gid() != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by a process of gid {}, not of the VM's ({want}): refused (a link the VMM left?)",
                path.display(),
                peer.gid()
            ),
        ));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that is not the VM's (another VM's, a host service's) is refused, even reached through a
    /// link at the VM's socket path; the VM's own listener is connected.
    #[tokio::test]
    async fn a_vm_socket_served_by_another_group_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let folder_gid = std::fs::metadata(dir.path()).unwrap().gid();
        let own = dir.path().join("own.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&own).unwrap();
        connect_vm_socket(&own).await.expect("the folder's group serves it");

        let elsewhere = tempfile::tempdir().unwrap();
        let foreign = elsewhere.path().join("foreign.sock");
        let other_gid = folder_gid + 4242;
        // A listener of another group: a child process with that gid binds and listens, then waits.
        let script = format!(
            "import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({:?}); s.listen(); print('up', flush=True); time.sleep(30)",
            foreign.display().to_string()
        );
        let mut child = std::process::Command::new("python3");
        std::os::unix::process::CommandExt::gid(&mut child, other_gid);
        let mut child = child.args(["-c", &script]).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let mut up = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut up).unwrap();
        assert_eq!(up.trim(), "up");
        let planted = dir.path().join("qmp.sock");
        std::os::unix::fs::symlink(&foreign, &planted).unwrap();
        let refused = connect_vm_socket(&planted).await.expect_err("another group's listener was connected");
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied, "{refused}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
