//! PID 1 duties. Anything that fails here is printed to the console (the VM's boot log on the host).
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub fn run() -> anyhow::Result<()> {
    mount_pseudo_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(name) = kernel_arg(&cmdline, "banger.hostname") {
        if let Err(e) = nix::unistd::sethostname(name) {
            eprintln!("banger-agent: sethostname {name}: {e}");
        }
    }
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    let hostname = kernel_arg(&cmdline, "banger.hostname").unwrap_or("localhost");
    let grow: Vec<&str> = kernel_arg(&cmdline, "banger.growfs").map(|g| g.split(',').collect()).unwrap_or_default();
    if grow.contains(&"root") {
        if let Some(dev) = find_by_label("banger-root") {
            grow_fs(&dev);
        }
    }
    mount_work_disk(grow.contains(&"work"));
    if let Err(e) = start_sshd(&cmdline) {
        eprintln!("banger-agent: ssh: {e}");
    }
    if let Err(e) = configure_network(&cmdline, hostname) {
        eprintln!("banger-agent: network: {e}");
    }
    let self_exe = std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/banger-agent".into());
    let mut server = spawn_server(&self_exe);
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty())) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) if Some(pid) == server => {
                eprintln!("banger-agent: server exited; restarting it");
                std::thread::sleep(Duration::from_millis(500));
                server = spawn_server(&self_exe);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => {}
        }
    }
}

/// Static network settings from the kernel command line (`banger.ip=ADDR/PREFIX banger.gw=GW banger.dns=DNS
/// banger.mac=MAC`), applied with iproute2. The NIC is found by its MAC, so no interface naming scheme is assumed.
fn configure_network(cmdline: &str, hostname: &str) -> anyhow::Result<()> {
    let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}.vm {hostname}\n");
    std::fs::write("/etc/hostname", format!("{hostname}\n"))?;
    std::fs::write("/etc/hosts", hosts)?;
    let (Some(ip), Some(mac)) = (kernel_arg(cmdline, "banger.ip"), kernel_arg(cmdline, "banger.mac")) else {
        return Ok(()); // no NIC for this VM
    };
    let iface = find_interface_by_mac(mac).ok_or_else(|| anyhow::anyhow!("no interface has MAC {mac}"))?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let st = Command::new("ip").args(args).status()?;
        anyhow::ensure!(st.success(), "ip {} failed", args.join(" "));
        Ok(())
    };
    run(&["addr", "add", ip, "dev", &iface])?;
    run(&["link", "set", &iface, "up"])?;
    if let Some(gw) = kernel_arg(cmdline, "banger.gw") {
        run(&["route", "add", "default", "via", gw, "dev", &iface])?;
    }
    if let Some(dns) = kernel_arg(cmdline, "banger.dns") {
        // `search vm` makes bare VM names resolve too.
        let _ = std::fs::remove_file("/etc/resolv.conf"); // may be a dangling symlink in some images
        std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\nsearch vm\noptions timeout:1 attempts:2\n"))?;
    }
    Ok(())
}

fn find_interface_by_mac(mac: &str) -> Option<String> {
    for _ in 0..100 {
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim().eq_ignore_ascii_case(mac) {
                    return Some(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        // virtio_net may still be probing.
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The device holding the ext4 filesystem with this label (disks are found by label: virtio-mmio does not
/// promise which one becomes vda).
fn find_by_label(label: &str) -> Option<String> {
    let out = Command::new("findfs").arg(format!("LABEL={label}")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|d| !d.is_empty())
}

/// Grows an ext4 filesystem to its (grown) disk, online.
fn grow_fs(dev: &str) {
    match Command::new("resize2fs").arg(dev).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("banger-agent: resize2fs {dev}: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => eprintln!("banger-agent: resize2fs {dev}: {e}"),
    }
}

/// Mounts the VM's work disk at /root: the user's and agents' files live there, on a disk of its own.
fn mount_work_disk(grow: bool) {
    let Some(dev) = find_by_label("banger-work") else { return };
    let _ = std::fs::create_dir_all("/root");
    if let Err(e) = mount(Some(dev.as_str()), "/root", Some("ext4"), MsFlags::MS_NOATIME, None::<&str>) {
        eprintln!("banger-agent: mount {dev} on /root: {e}");
        return;
    }
    if grow {
        grow_fs(&dev);
    }
}

/// Authorises banger's key for root, makes this VM's own host key (images carry none), and starts sshd
/// without waiting for it, so SSH never delays readiness.
fn start_sshd(cmdline: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    if !Path::new("/usr/sbin/sshd").exists() {
        return Ok(());
    }
    if let Some(encoded) = kernel_arg(cmdline, "banger.sshkey") {
        let key = String::from_utf8(base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded)?)?;
        std::fs::create_dir_all("/root/.ssh")?;
        std::fs::set_permissions("/root/.ssh", std::fs::Permissions::from_mode(0o700))?;
        let path = "/root/.ssh/authorized_keys";
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        if !existing.lines().any(|l| l.trim() == key.trim()) {
            std::fs::write(
                path,
                format!(
                    "{existing}{}{}\n",
                    if existing.is_empty() || existing.ends_with('\n') { "" } else { "\n" },
                    key.trim()
                ),
            )?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let host_key = "/etc/ssh/ssh_host_ed25519_key";
    if !Path::new(host_key).exists() {
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", host_key]).status()?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
    }
    std::fs::create_dir_all("/run/sshd")?;
    // sshd daemonises itself; init reaps it if it ever exits.
    Command::new("/usr/sbin/sshd")
        .args(["-o", &format!("HostKey={host_key}"), "-o", "PermitRootLogin=prohibit-password"])
        .spawn()?;
    Ok(())
}

fn spawn_server(exe: &Path) -> Option<Pid> {
    match Command::new(exe).arg("serve").env_clear().env("PATH", crate::exec::DEFAULT_PATH).spawn() {
        Ok(child) => Some(Pid::from_raw(child.id() as i32)),
        Err(e) => {
            eprintln!("banger-agent: cannot start server: {e}");
            None
        }
    }
}

fn mount_pseudo_filesystems() {
    let mounts: &[(&str, &str, &str, &str)] = &[
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ];
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (src, target, fstype, data) in mounts {
        if mounted.lines().any(|l| l.split_whitespace().nth(1) == Some(target)) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        let flags = MsFlags::MS_NOSUID
            | if *fstype == "devtmpfs" || *fstype == "devpts" { MsFlags::empty() } else { MsFlags::MS_NODEV };
        if let Err(e) = mount(Some(*src), *target, Some(*fstype), flags, Some(*data)) {
            eprintln!("banger-agent: mount {target}: {e}");
        }
    }
}

/// Value of `key=value` on the kernel command line.
pub fn kernel_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
