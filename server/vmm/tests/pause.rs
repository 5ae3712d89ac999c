//! The QEMU driver's pause and resume against a real guest: while paused the guest's agent does not answer
//! and its clock stands still; resumed, it answers again.
//!
//! Needs the boot assets `scripts/test.sh` exports (`BANGER_TEST_KERNEL`, `BANGER_TEST_ROOTFS`). No daemon, no
//! network: the driver alone boots the guest, as `banger bench`'s bare VMM does.
use std::path::Path;
use std::time::{Duration, Instant};

use banger_vmm::guest::{CancellationToken, GuestConn, GuestError};
use banger_vmm::{self as vmm, BootSpec, Driver, DriverSettings, GuestMemory, RootLayout, Tools, VmPaths};
use tools_schema::daemon::VmmKind;
use tools_schema::guest::{ExecSpec, GuestRequest};

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| {
        panic!("{k} is not set: guest tests need the boot assets that scripts/test.sh builds; run the suite with scripts/test.sh")
    })
}

/// Ends the guest's QEMU however the test ends.
struct StopOnDrop {
    dir: std::path::PathBuf,
    vm_id: String,
    pid: Option<u32>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            if banger_vmm::host::process_matches(pid, &vmm::process_marker(&self.vm_id)) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            vmm::reap(pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The guest's uptime in seconds, read by its agent.
async fn guest_uptime(conn: &GuestConn) -> f64 {
    let spec = ExecSpec {
        argv: vec!["cat".into(), "/proc/uptime".into()],
        env: Default::default(),
        cwd: None,
        stdin: false,
        timeout_ms: Some(10_000),
    };
    let out = conn.exec(spec, None, 4096, &CancellationToken::new()).await.expect("exec in the guest");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("uptime: {text:?}"))
}

#[tokio::test]
async fn a_paused_qemu_guest_stands_still_and_a_resumed_one_answers_again() {
    let (kernel, rootfs) = (var("BANGER_TEST_KERNEL"), var("BANGER_TEST_ROOTFS"));
    // The VMM detaches; as its subreaper this process reaps it by pid.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let dir = tempfile::Builder::new().prefix("banger-pause-").tempdir().unwrap().keep();
    let vm_id = format!("pause{}", std::process::id());
    let mut guard = StopOnDrop { dir: dir.clone(), vm_id: vm_id.clone(), pid: None };
    let paths = VmPaths::new(dir.clone());
    let tools = Tools::default();
    vmm::create_overlay_disk(&tools, Path::new(&rootfs), "raw", &paths.root_disk()).await.unwrap();
    let driver = Driver::new(
        VmmKind::Qemu,
        &DriverSettings {
            tools,
            qemu_accel: banger_vmm::host::qemu_accel(banger_vmm::host::acceleration()),
            qemu_vsock: false,
            qemu_root_layout: RootLayout::Qcow2,
        },
    );
    let spec = BootSpec {
        vm_id: vm_id.clone(),
        hostname: "pause".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: kernel.into(),
        initrd: std::env::var("BANGER_TEST_INITRD").ok().filter(|v| !v.is_empty()).map(Into::into),
        kernel_elf: None,
        layout: RootLayout::Qcow2,
        drives: RootLayout::Qcow2.drives(&paths, Path::new(&rootfs), false),
        dir: dir.clone(),
        net: None,
        args: Default::default(),
        vsock: driver.vsock(),
        memory: GuestMemory::Anonymous,
        template_mac: None,
        anchor: None,
        contain: None,
    };
    let launched = driver.launch(&spec).await.expect("QEMU starts");
    guard.pid = Some(launched.pid);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let (conn, _) = driver.channel(&paths).ready(deadline, &CancellationToken::new()).await.expect("the agent answers");
    conn.echo("before").await.expect("a running guest answers");

    let (host_before, guest_before) = (Instant::now(), guest_uptime(&conn).await);
    driver.pause(&dir, launched.pid).await.expect("pause");
    let echo = GuestRequest::Echo { data: "paused".into() };
    let paused = conn.request(&echo, Duration::from_secs(3), &CancellationToken::new()).await;
    assert!(matches!(paused, Err(GuestError::Timeout(_))), "a paused guest answered: {paused:?}");
    driver.resume(&dir, launched.pid).await.expect("resume");
    conn.echo("after").await.expect("a resumed guest answers again");
    let (host_after, guest_after) = (host_before.elapsed().as_secs_f64(), guest_uptime(&conn).await);
    // The guest lost at least most of the 3 s it stood still: its clock did not run while paused.
    assert!(
        guest_after - guest_before < host_after - 2.0,
        "the guest's clock ran while paused: guest +{:.2} s, host +{host_after:.2} s",
        guest_after - guest_before
    );

    conn.close();
    driver.kill(&dir, &vm_id, Some(launched.pid)).await;
    assert!(!driver.is_running(&vm_id, launched.pid), "QEMU outlived kill");
}
