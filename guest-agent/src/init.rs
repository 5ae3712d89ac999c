//! PID 1 duties. Anything that fails here is printed to the console (the VM's boot log on the host).
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tools_schema::boot::{BootArgs, BootNet, GrowFs};
use tools_schema::guest::GuestNetConfig;

pub fn run() -> anyhow::Result<()> {
    // Started by the kernel (no initramfs), PID 1 has no PATH: the tools it runs (resize2fs, ip, ssh-keygen)
    // would not be found.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", crate::exec::DEFAULT_PATH);
    }
    mount_pseudo_filesystems();
    make_dev_root();
    let boot = boot_args();
    if boot.overlay_root && !root_is_overlay() {
        // Booted without an initramfs (Firecracker): build the overlay root here, then go on as usual.
        if let Err(e) = overlay_root() {
            eprintln!("banger-agent: overlay root: {e:#}; powering off");
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
    }
    let hostname = boot.hostname.as_deref().unwrap_or("localhost");
    if let Err(e) = crate::identity::set_hostname(hostname) {
        eprintln!("banger-agent: hostname: {e}");
    }
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    if boot.grow.contains(&GrowFs::Root) {
        if let Some(dev) = find_by_label("banger-root") {
            grow_fs(&dev);
        }
    }
    mount_work_disk(boot.grow.contains(&GrowFs::Work));
    // A template guest is snapshotted once ready and restored as many clones: SSH and the network are each
    // clone's own, set up by `Reidentify` after the restore, never here.
    if !boot.template {
        let key = boot.ssh_key.clone();
        if let Err(e) = crate::identity::configure_network(boot.net.as_ref().map(net_config).as_ref()) {
            eprintln!("banger-agent: network: {e}");
        }
        // Making the host key takes a while in an emulated guest: never before the agent answers. A child
        // process does it, not a thread: PID 1's waitpid(-1) below would steal ssh-keygen's exit status.
        let self_exe = std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/banger-agent".into());
        let mut setup = Command::new(self_exe);
        setup.arg("ssh-setup");
        if let Some(k) = &key {
            setup.env("BANGER_SSH_KEY", k);
        }
        if let Err(e) = setup.spawn() {
            eprintln!("banger-agent: ssh: {e}");
        }
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

/// The agent's view of its boot arguments (`tools_schema::boot`). Words it cannot read are reported on the
/// console (the host shows it when the guest never answers) and skipped; the rest still apply.
pub fn boot_args() -> BootArgs {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (args, errors) = BootArgs::parse(&cmdline);
    for e in errors {
        eprintln!("banger-agent: {e}; ignored");
    }
    args
}

fn net_config(n: &BootNet) -> GuestNetConfig {
    // An address left out (0.0.0.0) means none: no default route, no resolver.
    let given = |a: std::net::Ipv4Addr| if a.is_unspecified() { String::new() } else { a.to_string() };
    GuestNetConfig {
        address: format!("{}/{}", n.address, n.prefix),
        mac: n.mac.clone(),
        gateway: given(n.gateway),
        dns: given(n.dns),
    }
}

fn root_is_overlay() -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/" && f[2] == "overlay"
    })
}

/// For VMMs without copy-on-write disks: the kernel mounted the image's shared base read-only as `/`; the
/// writes go to an overlayfs upper layer on the disk labelled `banger-overlay`. Staged on a tmpfs at /mnt,
/// then `pivot_root` into the overlay, with the pseudo filesystems moved along.
fn overlay_root() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let upper_dev = (0..250)
        .find_map(|_| {
            find_by_label("banger-overlay").or_else(|| {
                std::thread::sleep(Duration::from_millis(20));
                None
            })
        })
        .context("no overlay disk (no filesystem labelled banger-overlay)")?;
    let none = None::<&str>;
    mount(Some("tmpfs"), "/mnt", Some("tmpfs"), MsFlags::MS_NOSUID, Some("mode=0755")).context("tmpfs on /mnt")?;
    for d in ["/mnt/lower", "/mnt/upper", "/mnt/new"] {
        std::fs::create_dir_all(d)?;
    }
    mount(Some("/"), "/mnt/lower", none, MsFlags::MS_BIND, none).context("bind-mounting the base")?;
    mount(Some(upper_dev.as_str()), "/mnt/upper", Some("ext4"), MsFlags::MS_NOATIME, none)
        .with_context(|| format!("mounting {upper_dev}"))?;
    std::fs::create_dir_all("/mnt/upper/data")?;
    std::fs::create_dir_all("/mnt/upper/work")?;
    mount(
        Some("overlay"),
        "/mnt/new",
        Some("overlay"),
        MsFlags::empty(),
        Some("lowerdir=/mnt/lower,upperdir=/mnt/upper/data,workdir=/mnt/upper/work"),
    )
    .context("mounting the overlay")?;
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("/mnt/new{m}");
        std::fs::create_dir_all(&target)?;
        mount(Some(m), target.as_str(), none, MsFlags::MS_MOVE, none).with_context(|| format!("moving {m}"))?;
    }
    // The old root ends up on the overlay's /mnt, then is detached: the overlay holds what it needs.
    std::env::set_current_dir("/mnt/new")?;
    nix::unistd::pivot_root(".", "mnt").context("pivot_root")?;
    std::env::set_current_dir("/")?;
    nix::mount::umount2("/mnt", nix::mount::MntFlags::MNT_DETACH).context("detaching the old root")?;
    Ok(())
}

/// The device holding the ext4 filesystem with this label (disks are found by label: virtio-mmio does not
/// promise which one becomes vda).
/// Read straight from each disk's ext4 superblock: without an initramfs there is no udev, and `findfs`
/// does not find labels without its symlinks.
fn find_by_label(label: &str) -> Option<String> {
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .collect();
    disks.sort();
    disks.into_iter().map(|d| format!("/dev/{d}")).find(|dev| ext4_label(dev).as_deref() == Some(label))
}

/// The volume label of the ext4 filesystem on `dev`, if it holds one.
fn ext4_label(dev: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dev).ok()?;
    // The superblock starts at byte 1024: magic 0xEF53 at offset 56, the 16-byte volume name at 120.
    let mut sb = [0u8; 136];
    f.seek(SeekFrom::Start(1024)).ok()?;
    f.read_exact(&mut sb).ok()?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return None;
    }
    let name = &sb[120..136];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8(name[..end].to_vec()).ok()
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
    for (src, target, fstype, data) in mounts {
        // Read afresh each time: /proc itself is mounted by the first round, and the kernel may have mounted
        // /dev already (DEVTMPFS_MOUNT, when booted without an initramfs).
        let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
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

/// A root filesystem the kernel mounted itself (no initramfs) is listed as `/dev/root`, a node devtmpfs does
/// not have: tools that match mounts by device (resize2fs growing `/` online) then think it unmounted. The node
/// is made with the root's device number.
fn make_dev_root() {
    use nix::sys::stat::{mknod, Mode, SFlag};
    use std::os::unix::fs::MetadataExt;
    if Path::new("/dev/root").exists() {
        return;
    }
    if let Ok(m) = std::fs::metadata("/") {
        if let Err(e) = mknod("/dev/root", SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), m.dev()) {
            eprintln!("banger-agent: mknod /dev/root: {e}");
        }
    }
}

/// Value of `key=value` on the kernel command line.
#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_label_of_an_ext4_filesystem_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("banger-label-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (disk, junk) = (dir.join("disk.ext4"), dir.join("junk"));
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "banger-work"])
            .arg(&disk)
            .arg("8M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs) is installed");
        assert!(st.success());
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        assert_eq!(super::ext4_label(disk.to_str().unwrap()).as_deref(), Some("banger-work"));
        assert_eq!(super::ext4_label(junk.to_str().unwrap()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
