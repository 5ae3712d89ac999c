//! `banger doctor --boot`: a throwaway guest booted on every VMM the host can run, a command run in it, and
//! nothing left behind, whether the boot works or not.
use banger_e2e::*;
use serde_json::{json, Value};

/// Everything this test's daemon could have left: VM records, VM folders, VMM processes.
fn assert_nothing_left(d: &TestDaemon) {
    let vms = d.rpc("vm.list", json!({}));
    assert_eq!(vms["vms"].as_array().unwrap().len(), 0, "a self-test VM outlived the doctor: {vms}");
    d.assert_no_leaked_processes();
    let left: Vec<_> = std::fs::read_dir(d.state_dir.join("vms")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "VM folders left behind: {left:?}");
}

fn boot_of<'a>(report: &'a Value, vmm: &str) -> &'a Value {
    report["boots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["vmm"] == vmm)
        .unwrap_or_else(|| panic!("no {vmm} boot: {report}"))
}

#[test]
fn doctor_boot_proves_qemu_here_and_says_why_firecracker_was_not_tried() {
    let d = TestDaemon::start();
    d.register_test_image();
    let out = d.cli(&["doctor", "--boot", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --boot --json prints JSON");
    let qemu = boot_of(&report, "qemu");
    assert_eq!(qemu["status"], "pass", "{qemu}");
    assert_eq!(qemu["tried"], true);
    assert!(qemu["ready_ms"].as_u64().unwrap() > 0, "{qemu}");
    assert!(qemu["detail"].as_str().unwrap().contains("ran a command"), "{qemu}");
    let fc = boot_of(&report, "firecracker");
    if report["vmm"]["acceleration"] != "hardware_kvm" {
        // This host cannot boot Firecracker guests: not tried, and the report says why.
        assert_eq!(fc["tried"], false, "{fc}");
        assert_eq!(fc["status"], "warn", "{fc}");
        assert!(fc["detail"].as_str().unwrap().contains("needs hardware KVM"), "{fc}");
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(out.status.code(), Some(0));
    }
    assert_nothing_left(&d);

    // The human form shows a line per VMM.
    let out = d.cli(&["doctor", "--boot"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[pass] boot qemu"), "{text}");
    assert!(text.contains("boot firecracker"), "{text}");
    assert_nothing_left(&d);
}

#[test]
fn a_failing_boot_self_test_reports_why_and_leaves_nothing() {
    // A guest that never answers fails at the boot deadline: keep it short here.
    let d = TestDaemon::start_with_config("boot_timeout_secs = 8");
    let img = test_image();
    // A "kernel" no VMM can boot.
    let bogus = d.dir.path().join("not-a-kernel");
    std::fs::write(&bogus, vec![0x5a; 64 << 10]).unwrap();
    d.rpc(
        "image.register",
        json!({"name": "broken", "kernel": bogus, "kernel_elf": bogus, "rootfs": img.rootfs,
               "work_seed": img.work_seed, "make_default": true}),
    );
    let report = d.rpc("doctor.run", json!({"boot": true}));
    let qemu = boot_of(&report, "qemu");
    assert_eq!(qemu["status"], "fail", "{qemu}");
    assert!(qemu["detail"].as_str().unwrap().contains("did not boot"), "{qemu}");
    assert!(qemu.get("ready_ms").is_none(), "{qemu}");
    assert_eq!(report["ok"], false);
    assert_nothing_left(&d);
    // Over MCP the same operation takes the same argument.
    let mut mcp = RawMcp::connect(&d.socket);
    mcp.initialize();
    let r = mcp.request(2, "tools/call", json!({"name": "doctor_run", "arguments": {"boot": true}}));
    let text = r["result"]["content"][0]["text"].as_str().unwrap_or_default().to_string();
    assert!(text.contains("did not boot"), "{r}");
    assert_nothing_left(&d);
}
