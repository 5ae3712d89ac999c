//! The Firecracker driver against the real, pinned Firecracker binary.
//!
//! Everything here is about the VMM's API, not the guest: on hosts without hardware KVM the guest kernel
//! dies during boot (~40 s in), so the test finishes long before that and never waits for the guest.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_vmm::firecracker::{self, FcConfig, FcDrive, FcError, FcMachine};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const CACHE: &str = "/var/cache/banger";
const MEMORY_MIB: u32 = 256;

struct Assets {
    firecracker: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
}

/// Missing assets fail the test: a skipped VMM test looks like a passing one.
fn assets() -> Assets {
    let hint = "run scripts/setup-host.sh to install Firecracker, the kernel and an image";
    let need = |path: PathBuf| {
        assert!(path.is_file(), "{} is missing; {hint}", path.display());
        path
    };
    let firecracker = need(Path::new(CACHE).join("bin/firecracker"));
    let kernel = need(Path::new(CACHE).join("kernel/default/vmlinux"));
    let initrd = need(Path::new(CACHE).join("kernel/default/initramfs.cpio.gz"));
    let images = Path::new(CACHE).join("images");
    let rootfs = std::fs::read_dir(&images)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; {hint}", images.display()))
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "ext4"))
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .max()
        .map(|(_, path)| path)
        .unwrap_or_else(|| panic!("no *.ext4 image in {}; {hint}", images.display()));
    Assets { firecracker, kernel, initrd, rootfs }
}

/// Ends the Firecracker this test started if an assertion fails half-way, so no VMM outlives the test.
struct KillOnDrop(Option<u32>);

impl KillOnDrop {
    /// SIGKILL and reap; returns how the process ended.
    fn kill_and_reap(&mut self) -> Option<WaitStatus> {
        let pid = Pid::from_raw(self.0.take()? as i32);
        let _ = kill(pid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
                Ok(status) => return Some(status),
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok().map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
}

async fn state(vm: &FcMachine) -> String {
    let info = vm.info().await.expect("GET /");
    info["state"].as_str().unwrap_or_else(|| panic!("no state in {info}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_api_lifecycle() {
    let t0 = Instant::now();
    let assets = assets();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let marker = banger_vmm::process_marker(&uuid::Uuid::new_v4().to_string());
    let console = dir.join("console.log");

    let vm = firecracker::spawn(&assets.firecracker, &dir, &marker, &console).await.expect("spawn firecracker");
    let mut guard = KillOnDrop(Some(vm.pid));
    println!("spawned pid {} in {:?}", vm.pid, t0.elapsed());

    let cmd = cmdline(vm.pid).expect("the VMM's /proc entry");
    assert!(cmd.contains(&marker), "marker {marker} not in command line {cmd:?}");
    let info = vm.info().await.unwrap();
    assert_eq!(info["state"], "Not started", "{info}");
    assert_eq!(info["id"], marker.as_str(), "{info}");
    assert_eq!(info["vmm_version"], "1.12.1", "{info}");

    // A rejected call carries Firecracker's own explanation. On the fresh machine: a missing drive file.
    let missing = dir.join("no-such-disk.img");
    let bad = FcConfig {
        vcpus: 1,
        memory_mib: 128,
        kernel: assets.kernel.clone(),
        initrd: None,
        boot_args: String::new(),
        drives: vec![FcDrive { id: "missing".into(), path: missing.clone(), read_only: true, is_root: false }],
        net: None,
        vsock: None,
    };
    match vm.configure(&bad).await {
        Err(err @ FcError::Api { .. }) => {
            let FcError::Api { method, path, status, body } = &err else { unreachable!() };
            assert_eq!((method.as_str(), path.as_str(), *status), ("PUT", "/drives/missing", 400), "{err}");
            assert!(body.contains("No such file or directory"), "fault message: {body:?}");
            assert!(err.to_string().contains(body.as_str()), "message {err} lacks the fault message");
        }
        other => panic!("expected an API error for a missing drive, got {other:?}"),
    }

    let data = dir.join("data.img");
    std::fs::File::create(&data).unwrap().set_len(64 << 20).unwrap();
    let vsock_uds = dir.join("vsock.sock");
    let cfg = FcConfig {
        vcpus: 2,
        memory_mib: MEMORY_MIB,
        kernel: assets.kernel.clone(),
        initrd: Some(assets.initrd.clone()),
        boot_args: "console=ttyS0 reboot=k panic=1".into(),
        drives: vec![
            FcDrive { id: "rootfs".into(), path: assets.rootfs.clone(), read_only: true, is_root: true },
            FcDrive { id: "data".into(), path: data.clone(), read_only: false, is_root: false },
        ],
        net: None,
        vsock: Some((3, vsock_uds.clone())),
    };
    vm.configure(&cfg).await.expect("configure");
    let mc = vm.machine_config().await.unwrap();
    assert_eq!(mc["vcpu_count"], 2, "{mc}");
    assert_eq!(mc["mem_size_mib"], MEMORY_MIB, "{mc}");

    vm.start().await.expect("InstanceStart");
    assert_eq!(state(&vm).await, "Running");
    assert!(vsock_uds.exists(), "Firecracker did not create the vsock socket {}", vsock_uds.display());

    // Pre-boot configuration after start: rejected, with Firecracker's reason.
    let err = vm.configure(&cfg).await.expect_err("configure after start must fail");
    match &err {
        FcError::Api { path, status, body, .. } => {
            assert_eq!((path.as_str(), *status), ("/machine-config", 400), "{err}");
            assert!(body.contains("not supported after starting the microVM"), "fault message: {body:?}");
            assert!(err.to_string().contains(body.as_str()), "{err}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    vm.pause().await.expect("pause");
    assert_eq!(state(&vm).await, "Paused");
    let (snap_state, snap_mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let t_snap = Instant::now();
    vm.snapshot(&snap_state, &snap_mem).await.expect("snapshot");
    println!("snapshot took {:?}", t_snap.elapsed());
    let state_len = std::fs::metadata(&snap_state).unwrap().len();
    let mem_len = std::fs::metadata(&snap_mem).unwrap().len();
    assert!(state_len > 0, "empty state file");
    assert_eq!(mem_len, u64::from(MEMORY_MIB) << 20, "memory file size");
    println!("snapshot: state {state_len} bytes, memory {mem_len} bytes");
    vm.resume().await.expect("resume");
    assert_eq!(state(&vm).await, "Running");
    vm.send_ctrl_alt_del().await.expect("SendCtrlAltDel");

    // No guest listens (this early, the guest has not even loaded its vsock driver), so the hybrid
    // vsock handshake must end in an error within its bound rather than hang.
    let t_vsock = Instant::now();
    let refused = banger_vmm::hybrid_vsock::connect(&vsock_uds, 10_789).await.expect_err("no guest listener");
    println!("hybrid vsock connect without a guest listener: {:?} after {:?}", refused.kind(), t_vsock.elapsed());
    assert!(t_vsock.elapsed() < banger_vmm::hybrid_vsock::HANDSHAKE_TIMEOUT + Duration::from_secs(2));

    // The VMM is still ours and healthy; end it by pid, reap it, and make sure it is gone.
    assert_eq!(state(&vm).await, "Running");
    let pid = vm.pid;
    let status = guard.kill_and_reap().expect("reaping the VMM");
    assert_eq!(status, WaitStatus::Signaled(Pid::from_raw(pid as i32), Signal::SIGKILL, false));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still exists after reaping");
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| cmdline(*pid).is_some_and(|cmd| cmd.contains(&marker)))
        .map(|pid| format!("{pid}: {}", cmdline(pid).unwrap_or_default()))
        .collect();
    assert!(leftovers.is_empty(), "processes with this test's marker are left: {leftovers:?}");

    let console_text = std::fs::read_to_string(&console).unwrap();
    assert!(console_text.contains(&marker), "Firecracker's log (tagged with its id) goes to the console log");
    tmp.close().unwrap();
    assert!(!dir.exists(), "temporary directory left behind");
    println!("whole test took {:?}", t0.elapsed());
}

/// The clone-side half of Firecracker warm starts against the real binary: the VMM runs in a mount namespace
/// of its own with the VM's folder mounted at the template's anchor (its API socket, named under the anchor,
/// appears in the VM's folder and nowhere on the host's anchor), and it takes banger's snapshot-load request
/// (memory file backend, NIC override) as far as the snapshot file, which here is not one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_runs_with_its_folder_at_the_templates_anchor_and_takes_the_snapshot_load_request() {
    let assets = assets();
    let tmp = tempfile::tempdir().unwrap();
    let (dir, anchor) = (tmp.path().join("vm"), tmp.path().join("anchor"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&anchor).unwrap();
    let marker = banger_vmm::process_marker(&uuid::Uuid::new_v4().to_string());
    let vm = firecracker::spawn_anchored(&assets.firecracker, &dir, &anchor, &marker, &dir.join("console.log"))
        .await
        .expect("spawn firecracker in its own mount namespace");
    let mut guard = KillOnDrop(Some(vm.pid));
    assert!(dir.join(firecracker::API_SOCKET_NAME).exists(), "the API socket is in the VM's folder");
    assert!(!anchor.join(firecracker::API_SOCKET_NAME).exists(), "the host's anchor stays empty");
    assert_eq!(state(&vm).await, "Not started");

    let (snapshot, mem) = (dir.join("state"), dir.join("ram"));
    std::fs::write(&snapshot, b"not a snapshot").unwrap();
    std::fs::write(&mem, vec![0u8; 4096]).unwrap();
    match vm.load_snapshot(&snapshot, &mem, Some("bgtap9")).await {
        Err(FcError::Api { path, status, body, .. }) => {
            assert_eq!((path.as_str(), status), ("/snapshot/load", 400));
            assert!(body.contains("snapshot"), "Firecracker parsed the request and read the file: {body}");
        }
        other => panic!("expected Firecracker to refuse a file that is not a snapshot, got {other:?}"),
    }
    guard.kill_and_reap();
}
