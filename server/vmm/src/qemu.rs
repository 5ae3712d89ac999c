//! QEMU `microvm`: KVM-accelerated where hardware KVM works, software emulation (TCG) elsewhere.
use std::path::Path;

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

/// QEMU's own seccomp filter, every deny option on: no obsolete syscalls, no setuid/setgid/capability
/// changes, no fork/exec (so no `exec:` migration or helper scripts), no scheduler/affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The QEMU version installed (major, minor), read once from `--version`.
pub fn version(qemu: &Path) -> Option<(u32, u32)> {
    static SEEN: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *SEEN.get_or_init(|| {
        let out = std::process::Command::new(qemu).arg("--version").output().ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    })
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().skip_while(|w| *w != "version").nth(1)?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// How much of a VMM's or helper's log a start-up error quotes.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The descriptor number a contained QEMU gets its TAP at (`-netdev tap,fd=3`).
const TAP_FD: i32 = 3;
/// The descriptor number a clone gets its template's sealed RAM at (`mem-path=/proc/self/fd/4`).
const RAM_FD: i32 = 4;

pub async fn launch(cfg: &Tools, accel: QemuAccel, spec: &BootSpec) -> Result<Launched, VmmError> {
    let qemu = cfg.find_binary("qemu-system-x86_64").ok_or(VmmError::MissingBinary { binary: "qemu-system-x86_64" })?;
    let paths = VmPaths::new(spec.dir.clone());
    for stale in [paths.channel(), paths.control(), paths.pidfile()] {
        let _ = std::fs::remove_file(stale);
    }
    let io = |what: &str| {
        let what = what.to_string();
        move |source| VmmError::Io { what, source }
    };
    let log = crate::host_files::create_private(&paths.vmm_log()).map_err(io("creating the VMM log"))?;
    log.set_len(0).map_err(io("emptying the VMM log"))?;
    if let Some(c) = &spec.contain {
        c.prepare_dir(&spec.dir, &super::contained_files(&paths, spec))
            .map_err(io("giving the VM's folder to its VMM"))?;
    }
    if spec.vsock {
        start_vhost_vsock(cfg, &paths, spec).await?;
    }
    let cmdline = kernel_cmdline(accel, spec, crate::host::tsc_khz());
    let mut args: Vec<String> = vec![];
    let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
    // A clone's RAM is its template's, sealed (`sealed_ram`): every QEMU version maps it copy-on-write and
    // none can write it, and the template's file is not in the clone's view at all.
    let sealed_ram = match &spec.memory {
        super::GuestMemory::CloneOf(path) => {
            let path = path.clone();
            let sealed = tokio::task::spawn_blocking(move || crate::sealed_ram::sealed(&path))
                .await
                .map_err(|e| VmmError::Io {
                    what: "sealing the template's RAM".into(),
                    source: std::io::Error::other(e),
                })?
                .map_err(io("sealing the template's RAM"))?;
            Some(sealed)
        }
        _ => None,
    };
    let ram_backend = match &spec.memory {
        super::GuestMemory::Anonymous => None,
        super::GuestMemory::TemplateFile(path) => {
            Some(format!("mem-path={},share=on", path.display().to_string().replace(',', ",,")))
        }
        super::GuestMemory::CloneOf(_) => Some(format!("mem-path=/proc/self/fd/{RAM_FD},share=off")),
    };
    if let Some(file) = ram_backend {
        let backend = format!("memory-backend-file,id=mem,size={}M,{file}", spec.memory_mib);
        push(&["-object", &backend, "-machine", "memory-backend=mem"]);
    }
    if spec.vsock {
        // vhost-user devices need guest RAM the backend can map: a shared memfd.
        let backend = format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib);
        let chardev = format!("socket,id=vhostvsock,path={}", paths.vhost_vsock().display());
        push(&["-object", &backend, "-machine", "memory-backend=mem", "-chardev", &chardev]);
        push(&["-device", "vhost-user-vsock-device,chardev=vhostvsock"]);
    }
    let name = format!("{},process={}", spec.hostname, process_marker(&spec.vm_id));
    push(&["-name", &name, "-M", "microvm,acpi=on,pit=on,pic=on,rtc=on"]);
    push(&["-m", &spec.memory_mib.to_string(), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-sandbox", SANDBOX]);
    push(&["-kernel", &spec.kernel.display().to_string(), "-append", &cmdline.join(" ")]);
    if accel == QemuAccel::Tcg {
        // A smaller translation cache keeps idle RSS down without a measurable slowdown. `-cpu max` offers
        // every instruction set extension TCG emulates (SSE4, AVX2, ...): the default qemu64 model has none, and
        // modern binaries (Bun-built CLIs such as claude and opencode) die with SIGILL on it.
        push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]);
    } else {
        push(&["-accel", "kvm", "-cpu", "host"]);
    }
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    // The TAP is opened here and handed over: the VMM gets neither /dev/net/tun nor the right to open it.
    let tap = match &spec.net {
        Some((tap, _)) => Some(crate::tap::open(tap).map_err(io(&format!("opening TAP {tap}")))?),
        None => None,
    };
    match (&spec.net, &spec.template_mac) {
        (Some((_, net)), mac) => {
            let device = format!("virtio-net-device,netdev=net0,mac={}", mac.as_deref().unwrap_or(&net.mac));
            push(&["-netdev", &format!("tap,id=net0,fd={TAP_FD}"), "-device", &device]);
        }
        // A template's NIC: on a hub of its own, so nothing it sends goes anywhere.
        (None, Some(mac)) => {
            let device = format!("virtio-net-device,netdev=net0,mac={mac}");
            push(&["-netdev", "hubport,id=net0,hubid=0", "-device", &device]);
        }
        (None, None) => {}
    }
    let console = format!("file,id=console,path={},append=on", paths.console_log().display());
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    for drive in &spec.drives {
        push(&["-drive", &drive_option(drive), "-device", &format!("virtio-blk-device,drive={}", drive.id)]);
    }
    let agent = format!("socket,id=agent,path={},server=on,wait=off", paths.channel().display());
    let port = format!("virtserialport,chardev=agent,name={}", tools_schema::guest::VIRTIO_PORT_NAME);
    push(&["-device", "virtio-rng-device", "-device", "virtio-serial-device", "-chardev", &agent, "-device", &port]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", paths.control().display())]);
    if matches!(spec.memory, super::GuestMemory::CloneOf(_)) {
        push(&["-incoming", "defer"]);
    }
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let mut fds: Vec<(i32, i32)> = tap.iter().map(|t| (std::os::fd::AsRawFd::as_raw_fd(t), TAP_FD)).collect();
    fds.extend(sealed_ram.iter().map(|r| (std::os::fd::AsRawFd::as_raw_fd(&r.fd()), RAM_FD)));
    let program = crate::jail::Program { binary: &qemu, args: &args, env: &[], output: &log, fds: &fds };
    let launched = async {
        let outside = super::outside_files(spec);
        let pid = super::spawn_detached(spec, &program, &outside, accel == QemuAccel::Kvm, false)?;
        drop(tap);
        drop(sealed_ram);
        // Written at once, so a daemon that dies from here on still finds (and cleans up) the process.
        let _ = crate::host_files::write_fresh(&paths.pidfile(), pid.to_string().as_bytes());
        // QEMU answers on its control socket once it has started the machine; one that cannot start exits.
        let marker = process_marker(&spec.vm_id);
        let up = async {
            loop {
                if let Ok(q) = crate::qmp::Qmp::connect(&paths.control(), std::time::Duration::from_millis(50)).await {
                    return Ok(q);
                }
                if !crate::host::process_matches(pid, &marker) {
                    return Err(());
                }
            }
        };
        match tokio::time::timeout(std::time::Duration::from_secs(30), up).await {
            Ok(Ok(_)) => Ok(pid),
            failed => {
                super::kill(pid, &spec.vm_id).await;
                // What QEMU printed, capped: a VMM's output is no more trusted than its guest's.
                let detail = if failed.is_err() {
                    "qemu did not answer on its control socket in 30 s".into()
                } else {
                    crate::host_files::log_tail(&paths.vmm_log(), 20, LOG_TAIL_BYTES)
                };
                Err(VmmError::Launch { what: "starting qemu".into(), detail })
            }
        }
    }
    .await;
    launched.map(|pid| Launched { pid })
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

/// Starts vhost-device-vsock for the VM (detached and contained like the VMM) and waits for its vhost-user
/// socket.
async fn start_vhost_vsock(cfg: &Tools, paths: &VmPaths, spec: &BootSpec) -> Result<(), VmmError> {
    let bin = cfg.find_binary("vhost-device-vsock").ok_or(VmmError::MissingBinary { binary: "vhost-device-vsock" })?;
    for stale in [paths.vhost_vsock(), paths.vsock()] {
        let _ = std::fs::remove_file(stale);
    }
    let io = |what: &str| {
        let what = what.to_string();
        move |source| VmmError::Io { what, source }
    };
    let log_path = paths.dir.join("vhost-vsock.log");
    let log = crate::host_files::create_private(&log_path).map_err(io("creating the vhost-vsock log"))?;
    log.set_len(0).map_err(io("emptying the vhost-vsock log"))?;
    if let Some(c) = &spec.contain {
        c.prepare_dir(&spec.dir, std::slice::from_ref(&log_path))
            .map_err(io("giving the VM's folder to its helper"))?;
    }
    let args: Vec<std::ffi::OsString> = vec![
        "--vm".into(),
        format!("guest-cid=3,socket={},uds-path={}", paths.vhost_vsock().display(), paths.vsock().display()).into(),
    ];
    // Its own log level, never the daemon's environment: enough to tell, when a guest is unreachable,
    // whether the helper saw the connection (`vhost-vsock.log`, quoted in the error).
    let program =
        crate::jail::Program { binary: &bin, args: &args, env: &[("RUST_LOG", "info")], output: &log, fds: &[] };
    let pid = super::spawn_detached(spec, &program, &[], false, true)?;
    crate::host_files::write_fresh(&paths.vhost_vsock_pidfile(), pid.to_string().as_bytes())
        .map_err(io("writing the vhost-vsock pid file"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !paths.vhost_vsock().exists() {
        if std::time::Instant::now() > deadline {
            super::stop_helpers(&paths.dir).await;
            return Err(VmmError::Launch {
                what: "starting vhost-device-vsock".into(),
                detail: crate::host_files::log_tail(&log_path, 20, LOG_TAIL_BYTES),
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
            contain: None,
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
    fn the_qemu_version_is_read_from_its_banner() {
        let seven = "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022";
        assert_eq!(super::parse_version(seven), Some((7, 2)));
        assert_eq!(super::parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"), Some((10, 0)));
        assert_eq!(super::parse_version("nonsense"), None);
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
