//! Firecracker VMs through the daemon. Firecracker guests boot only on hardware KVM: on hosts whose KVM is
//! paravirtual (these CI machines) the daemon must refuse clearly, and the driver is exercised as far as the
//! host allows: spawn through its jailer, full configuration, start, and clean-up, checked through
//! Firecracker's own API and, for its containment, /proc and the cgroup files.
use std::time::{Duration, Instant};

use banger_e2e::*;

fn hardware_kvm(d: &TestDaemon) -> bool {
    d.rpc("doctor.run", json!({}))["vmm"]["acceleration"] == "hardware_kvm"
}

/// GET on Firecracker's API socket, as a client independent of banger's driver.
fn firecracker_api(socket: &std::path::Path, path: &str) -> Value {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {}: {e}; retrying", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("firecracker API socket {}: {e}", socket.display()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n").unwrap();
    // Firecracker keeps connections alive: read the headers, then exactly Content-Length bytes.
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)))
}

#[test]
fn firecracker_is_refused_up_front_where_it_cannot_boot_guests() {
    let d = TestDaemon::start();
    d.register_test_image();
    if hardware_kvm(&d) {
        // Nothing to refuse here: Firecracker is what this host picks by default (its guest boot is covered by
        // firecracker_guest_boots_and_runs_commands).
        assert_eq!(d.rpc("daemon.status", json!({}))["vmm"]["vmm"], "firecracker");
        return;
    }
    let e = d.rpc_raw("vm.create", json!({"name": "fc", "vmm": "firecracker"}));
    assert_eq!(e["error"]["data"]["code"], "host_unsupported", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("Firecracker needs hardware KVM"), "{e}");
    assert!(e["error"]["data"]["hint"].as_str().unwrap().contains("vmm qemu"), "{e}");
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]), "nothing was made");
}

#[test]
fn the_daemon_configures_and_starts_firecracker_and_cleans_it_up() {
    let d = TestDaemon::start_with_config("allow_firecracker_without_hardware_kvm = true");
    d.register_test_image();
    let op = d.rpc("vm.create_begin", json!({"name": "cracker", "vmm": "firecracker", "vcpus": 2, "memory_mib": 256}));
    // Wait until the daemon has started the VMM and waits for the guest agent.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d.rpc("operation.status", json!({"id": op["id"]}));
        let agent = s["stages"].as_array().unwrap().iter().find(|st| st["name"] == "agent").unwrap().clone();
        if agent["state"] == "running" || s["state"] != "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never reached the agent stage: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let vm_dir = std::fs::read_dir(d.state_dir.join("vms")).unwrap().next().expect("a VM directory").unwrap().path();
    let procs = d.processes_of_this_test();
    let fc: Vec<u32> = procs
        .iter()
        .filter(|(_, c)| c.starts_with("/firecracker ") && c.contains("--id banger-vm-"))
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(fc.len(), 1, "one Firecracker, run by its jailer from its chroot: {procs:?}");
    let pid = fc[0];
    // Firecracker's own view: started, with the shape the VM asked for.
    let api = vm_dir.join("firecracker.sock");
    let info = firecracker_api(&api, "/");
    assert_eq!(info["state"], "Running", "{info}");
    let config = firecracker_api(&api, "/vm/config");
    assert_eq!(config["machine-config"]["vcpu_count"], 2, "{config}");
    assert_eq!(config["machine-config"]["mem_size_mib"], 256, "{config}");
    let drives: Vec<&str> =
        config["drives"].as_array().unwrap().iter().map(|d| d["drive_id"].as_str().unwrap()).collect();
    assert_eq!(drives, ["base", "overlay", "work"], "{config}");
    assert_eq!(config["drives"][0]["is_read_only"], true, "the image's base is shared read-only");
    assert!(config["boot-source"]["boot_args"].as_str().unwrap().contains("banger.channel=vsock"), "{config}");
    assert_eq!(config["vsock"]["guest_cid"], 3, "{config}");
    let tap = config["network-interfaces"][0]["host_dev_name"].as_str().unwrap().to_string();
    assert!(tap.starts_with("bgtap"), "{config}");
    assert_firecracker_is_contained(&d, pid, &vm_dir, &tap);

    let done = d.rpc("operation.cancel", json!({"id": op["id"]}));
    if done["state"] == "succeeded" {
        // A hardware-KVM host may finish booting first: then deleting must clean up just as well.
        d.rpc("vm.delete", json!({"vms": ["cracker"]}));
    } else {
        assert_eq!(done["state"], "cancelled", "{done}");
    }
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    d.assert_no_leaked_processes();
    assert!(!vm_dir.exists(), "VM directory left behind");
    // Its TAP, if it went back to the pool, is root's again.
    let owner = d.netns.exec(&["cat", &format!("/sys/class/net/{tap}/owner")]);
    if owner.status.success() {
        assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "0", "{tap} after its VM");
    }
    let jails: Vec<_> = std::fs::read_dir("/run/banger-jails")
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let id = vm_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!jails.contains(&id), "the jail's folder of {id} is left: {jails:?}");
}

fn status_field(pid: u32, task: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap().trim().to_string()
}

/// Issue 17, read from the kernel: Firecracker runs as the VM's own uid with no capabilities, every thread
/// under Firecracker's seccomp filters with NoNewPrivs, PID 1 of its own PID namespace, in its own mount
/// namespace whose root is the jailer's chroot (the VM's folder and its image's files in it, nothing else of
/// the host: no other VM's folder, no daemon state), in the VM's cgroup with limits of its shape, and its TAP
/// is its uid's alone.
fn assert_firecracker_is_contained(d: &TestDaemon, pid: u32, vm_dir: &std::path::Path, tap: &str) {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let uid: u32 = status_field(pid, &pid.to_string(), "Uid").split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid > 1_900_000_000, "uid {uid}");
    for task in &tasks {
        for (field, want) in
            [("CapEff", "0000000000000000"), ("CapPrm", "0000000000000000"), ("NoNewPrivs", "1"), ("Seccomp", "2")]
        {
            assert_eq!(status_field(pid, task, field), want, "{field} of thread {task} of Firecracker {pid}");
        }
        assert_eq!(status_field(pid, task, "Groups"), "", "supplementary groups of thread {task}");
    }
    assert_eq!(status_field(pid, &pid.to_string(), "NSpid").split_whitespace().last(), Some("1"));
    for ns in ["mnt", "pid"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "{ns} namespace");
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &std::path::Path| root.join(p.strip_prefix("/").unwrap());
    assert!(root.join("firecracker").is_file(), "the jailer's copy of Firecracker in its chroot");
    assert!(inside(vm_dir).join("firecracker.sock").exists(), "its own VM folder");
    for host in ["etc", "home", "usr", "root"] {
        assert!(!root.join(host).exists(), "/{host} of the host is not in its root");
    }
    assert!(!inside(&d.state_dir).join("banger.db").exists(), "the daemon's state is not in its root");
    // The cgroup the daemon made for the VM, with the limits of 2 vCPUs and 256 MiB.
    let memory = ((256u64 + 256) << 20).to_string();
    assert_eq!(cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max"), memory);
    assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").split_whitespace().next(), Some("250000"));
    assert_eq!(cgroup_file(pid, "pids", "pids.max", "pids.max"), "512");
    let owner = d.netns.exec(&["cat", &format!("/sys/class/net/{tap}/owner")]);
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), uid.to_string(), "the owner of {tap}");
    // What banger reports agrees (and comes from the same files).
    let shown = d.rpc("vm.show", json!({"vm": "cracker"}));
    assert_eq!(shown["containment"]["uid"], uid, "{shown}");
    assert_eq!(shown["containment"]["contained"], true, "{shown}");
    assert_eq!(shown["containment"]["seccomp"], true, "{shown}");
}

#[test]
#[ignore = "needs hardware KVM: Firecracker guests cannot boot on paravirtual KVM (kvm_pvm) hosts such as CI; run with --run-ignored on a KVM workstation"]
fn firecracker_guest_boots_and_runs_commands() {
    let d = TestDaemon::start();
    d.register_test_image();
    assert!(hardware_kvm(&d), "this test needs hardware KVM");
    let vm = d.rpc("vm.create", json!({"name": "fcguest", "vmm": "firecracker", "memory_mib": 256}));
    assert_eq!(vm["vmm"], "firecracker");
    let r = d
        .rpc("vm.exec", json!({"vm": "fcguest", "command": ["sh", "-c", "echo hi; mountpoint -q /root && echo work"]}));
    assert_eq!(r["stdout"], "hi\nwork\n", "{r}");
    d.rpc("vm.stop", json!({"vms": ["fcguest"]}));
    d.rpc("vm.start", json!({"vms": ["fcguest"]}));
    assert_eq!(d.rpc("vm.exec", json!({"vm": "fcguest", "command": ["echo", "again"]}))["stdout"], "again\n");
    d.rpc("vm.delete", json!({"vms": ["fcguest"]}));
    d.assert_no_leaked_processes();
}

#[test]
#[ignore = "needs hardware KVM: Firecracker guests cannot boot on paravirtual KVM (kvm_pvm) hosts such as CI; run with --run-ignored on a KVM workstation"]
fn firecracker_clones_of_one_template_are_distinct_vms() {
    let d = TestDaemon::start();
    d.register_test_image();
    assert!(hardware_kvm(&d), "this test needs hardware KVM");
    // On a hardware-KVM host Firecracker is the daemon's VMM, so image.warm makes a Firecracker template.
    let t = d.rpc("image.warm", json!({"memory_mib": 256}));
    assert_eq!(t["reused"], false, "{t}");
    let mut seen = vec![];
    for name in ["fc-a", "fc-b"] {
        let vm = d.rpc("vm.create", json!({"name": name, "vmm": "firecracker", "memory_mib": 256}));
        assert_eq!(vm["boot"]["mode"], "warm", "{vm}");
        let out = d.guest_ok(
            name,
            "cat /sys/class/net/eth0/address; hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
             mountpoint -q /root && echo work",
        );
        let lines: Vec<String> = out.lines().map(String::from).collect();
        assert_eq!((lines[1].as_str(), lines[3].as_str()), (name, "work"), "{out}");
        assert_eq!(d.guest_ok("fc-a", &format!("getent hosts {name}.vm | cut -d' ' -f1")).trim(), vm["ip"]);
        seen.push(lines);
    }
    assert_ne!(seen[0][0], seen[1][0], "MACs");
    assert_ne!(seen[0][2], seen[1][2], "RNG output");
    d.rpc("vm.stop", json!({"vms": ["fc-a"]}));
    d.rpc("vm.start", json!({"vms": ["fc-a"]}));
    assert_eq!(d.guest_ok("fc-a", "hostname").trim(), "fc-a");
    d.rpc("vm.delete", json!({"vms": ["fc-a", "fc-b"]}));
    d.assert_no_leaked_processes();
}
