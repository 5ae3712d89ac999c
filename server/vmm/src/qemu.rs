//! QEMU `microvm`: KVM-accelerated where hardware KVM works, software emulation (TCG) elsewhere.
use tokio::process::Command;

use tools_schema::boot::ChannelKind;
use tools_schema::daemon::{QemuAccel, VmmKind};

use super::{process_marker, BootSpec, FindBinary, Launched, Tools, VmPaths, VmmError};

/// The guest kernel's command line: the kernel's own words, then the agent's (`BootSpec::agent_args`).
fn kernel_cmdline(accel: QemuAccel, spec: &BootSpec, tsc_khz: Option<u64>) -> Vec<String> {
    let mut cmdline = vec!["console=ttyS0".to_string(), "quiet".into(), "panic=-1".into()];
    // The root disk is the first virtio-blk device on the command line, which the kernel names vda.
    cmdline.extend(spec.layout.kernel_args(spec.initrd.is_some()));
    if accel == QemuAccel::Tcg {
        // Without these, most TCG boots hang calibrating the timer.
        if let Some(khz) = tsc_khz {
            cmdline.push(format!("tsc_early_khz={khz}"));
        }
        cmdline.push("tsc=reliable".into());
    }
    let channel = if spec.vsock { ChannelKind::Vsock } else { ChannelKind::VirtioSerial };
    cmdline.extend(spec.agent_args(VmmKind::Qemu, channel).render());
    cmdline
}

pub async fn launch(cfg: &Tools, accel: QemuAccel, spec: &BootSpec) -> Result<Launched, VmmError> {
    let qemu = cfg.find_binary("qemu-system-x86_64").ok_or(VmmError::MissingBinary { binary: "qemu-system-x86_64" })?;
    let paths = VmPaths::new(spec.dir.clone());
    for stale in [paths.channel(), paths.control(), paths.pidfile()] {
        let _ = std::fs::remove_file(stale);
    }
    if spec.vsock {
        start_vhost_vsock(cfg, &paths).await?;
    }
    let cmdline = kernel_cmdline(accel, spec, crate::host::tsc_khz());
    let mut cmd = Command::new(qemu);
    match &spec.memory {
        super::GuestMemory::Anonymous => {}
        super::GuestMemory::TemplateFile(path) | super::GuestMemory::CloneOf(path) => {
            let share = if matches!(spec.memory, super::GuestMemory::TemplateFile(_)) { "on" } else { "off" };
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=mem,size={}M,mem-path={},share={share}",
                    spec.memory_mib,
                    path.display()
                ))
                .args(["-machine", "memory-backend=mem"]);
        }
    }
    if spec.vsock {
        // vhost-user devices need guest RAM the backend can map: a shared memfd.
        cmd.arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib))
            .args(["-machine", "memory-backend=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vhostvsock,path={}", paths.vhost_vsock().display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vhostvsock"]);
    }
    cmd.arg("-name")
        .arg(format!("{},process={}", spec.hostname, process_marker(&spec.vm_id)))
        .args(["-M", "microvm,acpi=on,pit=on,pic=on,rtc=on"])
        .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&spec.kernel)
        .args(["-append", &cmdline.join(" ")]);
    if accel == QemuAccel::Tcg {
        // A smaller translation cache keeps idle RSS down without a measurable slowdown. `-cpu max` offers
        // every instruction set extension TCG emulates (SSE4, AVX2, ...): the default qemu64 model has none, and
        // modern binaries (Bun-built CLIs such as claude and opencode) die with SIGILL on it.
        cmd.args(["-accel", "tcg,tb-size=64", "-cpu", "max"]);
    } else {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    }
    if let Some(initrd) = &spec.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    match (&spec.net, &spec.template_mac) {
        (Some((tap, net)), mac) => {
            cmd.arg("-netdev")
                .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=net0,mac={}", mac.as_deref().unwrap_or(&net.mac)));
        }
        // A template's NIC: on a hub of its own, so nothing it sends goes anywhere.
        (None, Some(mac)) => {
            cmd.args(["-netdev", "hubport,id=net0,hubid=0"])
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=net0,mac={mac}"));
        }
        (None, None) => {}
    }
    cmd.arg("-chardev")
        .arg(format!("file,id=console,path={},append=on", paths.console_log().display()))
        .args(["-serial", "chardev:console"]);
    for drive in &spec.drives {
        cmd.arg("-drive").arg(drive_option(drive)).arg("-device").arg(format!("virtio-blk-device,drive={}", drive.id));
    }
    cmd.args(["-device", "virtio-rng-device"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("socket,id=agent,path={},server=on,wait=off", paths.channel().display()))
        .arg("-device")
        .arg(format!("virtserialport,chardev=agent,name={}", tools_schema::guest::VIRTIO_PORT_NAME))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", paths.control().display()))
        // -daemonize: QEMU reports start-up errors before detaching, then lives on its own, so a daemon
        // restart does not take VMs with it.
        .arg("-daemonize")
        .arg("-pidfile")
        .arg(paths.pidfile());
    if matches!(spec.memory, super::GuestMemory::CloneOf(_)) {
        cmd.args(["-incoming", "defer"]);
    }
    let launched = async {
        let out = cmd.output().await.map_err(|source| VmmError::Io { what: "starting qemu".into(), source })?;
        if !out.status.success() {
            return Err(VmmError::Launch {
                what: "starting qemu".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        std::fs::read_to_string(paths.pidfile())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| VmmError::Launch { what: "starting qemu".into(), detail: "qemu wrote no pid file".into() })
    }
    .await;
    match launched {
        Ok(pid) => Ok(Launched { pid }),
        Err(e) => {
            // No VMM came up, so nobody else will end the helper started for it.
            super::stop_helpers(&paths.dir).await;
            Err(e)
        }
    }
}

/// QEMU's `-drive` option for one of the VM's disks: the format said, never probed (a raw disk the guest
/// wrote a qcow2 header into stays raw); a read-only disk opened read-only on the host (`readonly=on`, so the
/// file is never opened for writing and may be shared by many VMs), a writable one passing the guest's
/// discards on.
fn drive_option(drive: &super::Drive) -> String {
    let format = match drive.format {
        super::DiskFormat::Raw => "raw",
        super::DiskFormat::Qcow2 => "qcow2",
    };
    let access = match drive.access {
        super::DiskAccess::ReadOnly => "readonly=on",
        super::DiskAccess::ReadWrite => "discard=unmap,cache=writeback",
    };
    // A comma in a path would end the option early: QEMU escapes it as two commas.
    let file = drive.path.display().to_string().replace(',', ",,");
    format!("id={},file={file},format={format},if=none,{access}", drive.id)
}

/// Starts vhost-device-vsock for the VM (detached, like the VMM) and waits for its vhost-user socket.
async fn start_vhost_vsock(cfg: &Tools, paths: &VmPaths) -> Result<(), VmmError> {
    let bin = cfg.find_binary("vhost-device-vsock").ok_or(VmmError::MissingBinary { binary: "vhost-device-vsock" })?;
    for stale in [paths.vhost_vsock(), paths.vsock()] {
        let _ = std::fs::remove_file(stale);
    }
    let io = |what: &str| {
        let what = what.to_string();
        move |source| VmmError::Io { what, source }
    };
    let log = std::fs::File::create(paths.dir.join("vhost-vsock.log")).map_err(io("creating the vhost-vsock log"))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--vm")
        .arg(format!("guest-cid=3,socket={},uds-path={}", paths.vhost_vsock().display(), paths.vsock().display()))
        // Its own log level, never the daemon's environment: enough to tell, when a guest is unreachable,
        // whether the helper saw the connection (`vhost-vsock.log`, quoted in the error).
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io("logging"))?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the helper from the daemon's session.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().map_err(io("starting vhost-device-vsock"))?;
    let pid = child.id();
    drop(child); // a std Child is not reaped on drop; the daemon reaps helpers by pid, like VMMs
    std::fs::write(paths.vhost_vsock_pidfile(), pid.to_string()).map_err(io("writing the vhost-vsock pid file"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !paths.vhost_vsock().exists() {
        if std::time::Instant::now() > deadline {
            super::stop_helpers(&paths.dir).await;
            let log = std::fs::read_to_string(paths.dir.join("vhost-vsock.log")).unwrap_or_default();
            return Err(VmmError::Launch {
                what: "starting vhost-device-vsock".into(),
                detail: log.trim().to_string(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{BootSpec, DiskAccess, DiskFormat, GuestMemory, RootLayout, VmPaths};
    use std::path::Path;
    use tools_schema::boot::{BootArgs, BootNet, ChannelKind, GrowFs};
    use tools_schema::daemon::{QemuAccel, VmmKind};

    fn spec(layout: RootLayout, vsock: bool, template_mac: Option<&str>) -> BootSpec {
        let paths = VmPaths::new("/vms/a".into());
        BootSpec {
            vm_id: "a".into(),
            hostname: "dev-1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/img/vmlinux".into(),
            initrd: None,
            kernel_elf: None,
            layout,
            drives: layout.drives(&paths, Path::new("/img/root.ext4"), true),
            dir: paths.dir.clone(),
            net: Some((
                "bgtap0".into(),
                crate::net::GuestNet {
                    ip: "10.0.0.2".parse().unwrap(),
                    prefix: 24,
                    gateway: "10.0.0.1".parse().unwrap(),
                    mac: "02:00:00:00:00:02".into(),
                },
            )),
            args: BootArgs {
                grow: vec![GrowFs::Root, GrowFs::Work],
                ssh_key: Some("ssh-ed25519 AAAAC3Nz banger".into()),
                ..Default::default()
            },
            vsock,
            memory: GuestMemory::Anonymous,
            template_mac: template_mac.map(String::from),
            anchor: None,
        }
    }

    /// What the daemon puts on a guest's command line is what the agent reads back, word for word, for both
    /// VMMs: the command lines are made only by `BootSpec::agent_args` and `BootArgs::render`.
    #[test]
    fn the_agent_reads_back_exactly_what_each_driver_renders() {
        let net = BootNet {
            address: "10.0.0.2".parse().unwrap(),
            prefix: 24,
            gateway: "10.0.0.1".parse().unwrap(),
            dns: "10.0.0.1".parse().unwrap(),
            mac: "02:00:00:00:00:02".into(),
        };
        let want = BootArgs {
            hostname: Some("dev-1".into()),
            channel: ChannelKind::VirtioSerial,
            vmm: None,
            overlay_root: false,
            template: false,
            grow: vec![GrowFs::Root, GrowFs::Work],
            ssh_key: Some("ssh-ed25519 AAAAC3Nz banger".into()),
            net: Some(net),
        };
        let read = |words: Vec<String>| {
            let (args, errors) = BootArgs::parse(&words.join(" "));
            assert!(errors.is_empty(), "{errors:?} in {words:?}");
            args
        };
        let qemu = super::kernel_cmdline(QemuAccel::Tcg, &spec(RootLayout::Qcow2, false, None), Some(2_000_000));
        assert!(qemu.iter().any(|w| w == "tsc_early_khz=2000000"), "{qemu:?}");
        assert_eq!(read(qemu), want);
        let vsock = super::kernel_cmdline(QemuAccel::Kvm, &spec(RootLayout::Overlay, true, None), None);
        assert_eq!(read(vsock), BootArgs { channel: ChannelKind::Vsock, overlay_root: true, ..want.clone() });
        let fc = super::super::firecracker_cmdline(&spec(RootLayout::Overlay, true, None));
        assert_eq!(
            read(fc),
            BootArgs {
                channel: ChannelKind::Vsock,
                vmm: Some(VmmKind::Firecracker),
                overlay_root: true,
                ..want.clone()
            }
        );
        // A template's command line carries no network: each clone's agent gets its own after the restore.
        let template =
            super::kernel_cmdline(QemuAccel::Tcg, &spec(RootLayout::Qcow2, false, Some("52:54:00:b0:00:01")), None);
        assert_eq!(read(template).net, None);
    }

    #[test]
    fn each_layout_renders_its_drives_with_their_format_and_access() {
        let paths = VmPaths::new("/vms/a".into());
        let render = |layout: RootLayout| -> Vec<String> {
            layout.drives(&paths, Path::new("/img/root,1.ext4"), true).iter().map(super::drive_option).collect()
        };
        assert_eq!(
            render(RootLayout::Overlay),
            [
                "id=base,file=/img/root,,1.ext4,format=raw,if=none,readonly=on",
                "id=overlay,file=/vms/a/overlay.ext4,format=raw,if=none,discard=unmap,cache=writeback",
                "id=work,file=/vms/a/work.ext4,format=raw,if=none,discard=unmap,cache=writeback",
            ]
        );
        assert_eq!(
            render(RootLayout::Qcow2),
            [
                "id=root,file=/vms/a/root.qcow2,format=qcow2,if=none,discard=unmap,cache=writeback",
                "id=work,file=/vms/a/work.qcow2,format=qcow2,if=none,discard=unmap,cache=writeback",
            ]
        );
        let base = &RootLayout::Overlay.drives(&paths, Path::new("/img/r"), false)[0];
        assert_eq!((base.format, base.access), (DiskFormat::Raw, DiskAccess::ReadOnly));
        assert_eq!(RootLayout::Overlay.drives(&paths, Path::new("/img/r"), false).len(), 2);
        assert_eq!(
            RootLayout::Overlay.kernel_args(false),
            ["root=/dev/vda", "ro", "rootfstype=ext4", "init=/usr/local/bin/banger-agent"]
        );
        assert_eq!(RootLayout::Qcow2.kernel_args(true), Vec::<String>::new());
    }

    #[test]
    fn firecracker_gets_raw_drives_under_its_anchor_and_refuses_qcow2() {
        use super::super::firecracker::FcDrive;
        let paths = VmPaths::new("/vms/a".into());
        let drives = RootLayout::Overlay.drives(&paths, Path::new("/img/r"), true);
        let fc: Vec<FcDrive> =
            drives.iter().map(|d| FcDrive::of(d, Path::new("/vms/a"), Path::new("/anchor/g")).unwrap()).collect();
        let seen: Vec<(&str, &Path, bool)> =
            fc.iter().map(|d| (d.id.as_str(), d.path.as_path(), d.read_only)).collect();
        assert_eq!(
            seen,
            [
                ("base", Path::new("/img/r"), true),
                ("overlay", Path::new("/anchor/g/overlay.ext4"), false),
                ("work", Path::new("/anchor/g/work.ext4"), false),
            ]
        );
        let qcow = &RootLayout::Qcow2.drives(&paths, Path::new("/img/r"), false)[0];
        assert!(FcDrive::of(qcow, Path::new("/vms/a"), Path::new("/vms/a")).is_err());
    }
}
