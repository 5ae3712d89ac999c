//! Firecracker's guest layout, booted where it can run: under QEMU (`qemu_root_layout = "overlay"`), with the
//! lean kernel and no initramfs, so the agent builds the overlay root as PID 1 exactly as in a Firecracker
//! guest. Everything but the VMM itself: the image's root filesystem raw and read-only as vda, the overlay
//! disk taking the writes, the raw work disk on /root, and `banger.overlay=1 root=/dev/vda ro`.
use std::time::Duration;

use banger_e2e::*;

/// sha256 of a file, by the host's sha256sum (an implementation independent of the code under test).
fn sha256(path: &str) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
    assert!(out.status.success(), "sha256sum {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The open flags of every descriptor process `pid` holds on `path` (from /proc/PID/fdinfo, octal).
fn open_flags(pid: u32, path: &str) -> Vec<u32> {
    let want = std::fs::canonicalize(path).unwrap();
    let mut flags = vec![];
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap();
        let f = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        flags.push(u32::from_str_radix(f, 8).unwrap());
    }
    flags
}

#[test]
fn firecracker_disk_layout_boots_under_qemu_and_keeps_its_writes_off_the_base() {
    assert!(
        test_image().initrd.is_none(),
        "this test boots the lean kernel (no initramfs), which makes the agent build the overlay root itself"
    );
    let d = TestDaemon::start_with_config("qemu_root_layout = \"overlay\"\n");
    let image = d.register_test_image();
    let base = image["rootfs"].as_str().expect("the image's root filesystem").to_string();
    let base_hash = sha256(&base);

    let vm = d.cli_json(&["vm", "create", "--name", "fclayout", "--memory", "384"]);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["boot"]["mode"], "cold", "the overlay layout is never templated: {vm}");
    let pid = vm["pid"].as_u64().unwrap() as u32;

    // The guest booted Firecracker's command line and built the overlay root over a read-only base.
    let cmdline = d.guest_ok("fclayout", "cat /proc/cmdline");
    for arg in ["banger.overlay=1", "root=/dev/vda", " ro ", "init=/usr/local/bin/banger-agent"] {
        assert!(format!(" {} ", cmdline.trim()).contains(arg), "{arg:?} not on the command line: {cmdline}");
    }
    let mounts = d.guest_ok("fclayout", "cat /proc/mounts");
    let root = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some("/")).expect("a root mount");
    assert!(root.starts_with("overlay / overlay "), "/ is not the overlay: {mounts}");
    assert!(
        mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/root")),
        "the work disk is not on /root: {mounts}"
    );
    // vda is the base, read-only to the guest too: the kernel refuses to write it.
    assert_eq!(d.guest_ok("fclayout", "cat /sys/block/vda/ro").trim(), "1");
    let r = d.guest_sh("fclayout", "dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=notrunc 2>&1");
    assert_ne!(r["exit_code"], 0, "the guest wrote its read-only base: {r}");

    // The host opened the base read-only (O_ACCMODE = O_RDONLY), and nothing else is open on it for writing.
    let flags = open_flags(pid, &base);
    assert!(!flags.is_empty(), "QEMU {pid} does not hold the base {base} open");
    assert!(flags.iter().all(|f| f & 0o3 == 0), "QEMU opened the base for writing: flags {flags:?} (decimal)");

    // A command runs; files written to / (the overlay) and /root (the work disk) survive a stop and start.
    assert_eq!(d.guest_ok("fclayout", "echo hello from the overlay"), "hello from the overlay\n");
    d.guest_ok("fclayout", "echo on-root > /etc/banger-layout-marker && echo on-work > /root/marker && sync");
    let r = d.rpc("vm.stop", json!({"vms": ["fclayout"]}));
    assert_eq!(r["results"][0]["info"]["state"], "stopped", "{r}");
    wait_until("the VMM to exit", Duration::from_secs(30), || !process_alive(pid));
    let r = d.rpc("vm.start", json!({"vms": ["fclayout"]}));
    assert_eq!(r["results"][0]["info"]["state"], "running", "{r}");
    assert_eq!(d.guest_ok("fclayout", "cat /etc/banger-layout-marker /root/marker"), "on-root\non-work\n");
    let mounts = d.guest_ok("fclayout", "cat /proc/mounts");
    assert!(mounts.lines().any(|l| l.starts_with("overlay / overlay ")), "restarted without the overlay: {mounts}");

    let r = d.rpc("vm.delete", json!({"vms": ["fclayout"]}));
    assert_eq!(r["ok"], true, "{r}");
    // Every write went to the VM's own disks: the shared base is byte for byte what it was.
    assert_eq!(sha256(&base), base_hash, "the image's root filesystem changed");
    d.assert_no_leaked_processes();
}
