//! The VMM is contained (issue 17): every fact here is read from /proc, the cgroup files and the VMM's own
//! mount namespace, never from banger's records.
use banger_e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[test]
fn the_vmm_runs_unprivileged_filtered_namespaced_and_limited_and_sees_only_its_own_vm() {
    // A uid range of this test's own: other tests' daemons (which do not know this one's store) would
    // otherwise take the stopped VM's uid, which is theirs to take.
    let d = TestDaemon::start_with_config("[containment]\nuid_base = 1950000000\nuid_count = 1000");
    d.register_test_image();
    let a = d.rpc("vm.create", json!({"name": "jailed", "memory_mib": 256, "vcpus": 2, "boot": "cold"}));
    let b = d.rpc("vm.create", json!({"name": "neighbour", "memory_mib": 256, "vcpus": 1}));
    let pid = d.qemu_pid(&a);
    let daemon = d.pid();

    let uids: Vec<u32> = proc_status(pid, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(uids.iter().all(|u| *u == uids[0] && *u > 1_950_000_000), "uids {uids:?}");
    let gids: Vec<u32> = proc_status(pid, "Gid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(gids.iter().all(|g| *g == uids[0]), "gids {gids:?}");
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2");
    for ns in ["mnt", "pid"] {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(of(pid), of(daemon), "the VMM has a {ns} namespace of its own");
    }
    assert_eq!(proc_status(pid, "NSpid").split_whitespace().last(), Some("1"), "PID 1 of its namespace");
    let other = d.qemu_pid(&b);
    assert_ne!(proc_status(other, "Uid"), proc_status(pid, "Uid"), "each VM has a uid of its own");

    // Limits follow the shape: RAM + 256 MiB, 2 vCPUs + half a CPU, 512 tasks.
    let memory = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max");
    assert_eq!(memory, ((256u64 + 256) << 20).to_string());
    let cpu_v1 = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap().lines().any(|l| l.contains(":cpu"));
    if cpu_v1 {
        assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max"), "250000");
    } else {
        assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max"), "250000 100000");
    }
    assert_eq!(cgroup_file(pid, "pids", "pids.max", "pids.max"), "512");
    // And a CPU weight of 100 per vCPU (v1 shares: 1024 per vCPU).
    let weight = cgroup_file(pid, "cpu", "cpu.shares", "cpu.weight");
    assert_eq!(weight, if cpu_v1 { "2048" } else { "200" });

    // From inside the VMM's mount namespace: its own folder, not the neighbour's, not the daemon's state.
    let state = d.state_dir.clone();
    let inside = |path: &std::path::Path| {
        std::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "--", "test", "-e"])
            .arg(path)
            .status()
            .unwrap()
            .success()
    };
    let own = state.join("vms").join(a["id"].as_str().unwrap());
    assert!(inside(&own.join("console.log")), "the VMM sees its own folder");
    assert!(!inside(&state.join("vms").join(b["id"].as_str().unwrap())), "the neighbour's disks are invisible");
    for daemons in ["banger.db", "ssh", "bangerd.log"] {
        if state.join(daemons).exists() {
            assert!(!inside(&state.join(daemons)), "{daemons} is invisible to the VMM");
        }
    }
    assert!(!inside(std::path::Path::new("/root")) && !inside(std::path::Path::new("/home")), "no homes");

    // vm show reports what the kernel says.
    let shown = d.rpc("vm.show", json!({"vm": "jailed"}));
    assert_eq!(shown["containment"]["uid"], uids[0], "{shown}");
    assert_eq!(shown["containment"]["memory_limit_bytes"], (256u64 + 256) << 20, "{shown}");
    let out = d.cli(&["vm", "show", "jailed"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("uid {}, seccomp on, memory 512 MiB, CPU 250%, 512 tasks", uids[0])), "{text}");

    // The CPU limit changes on the running VM, in its cgroup, through either door; 0 is the shape's again.
    let quota =
        || cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").split_whitespace().next().unwrap().to_string();
    let set = d.rpc("vm.set", json!({"vm": "jailed", "cpu_percent": 30}));
    assert_eq!(set["results"][0]["info"]["containment"]["cpu_limit_percent"], 30, "{set}");
    assert_eq!(quota(), "30000");
    let out = d.cli(&["vm", "set", "jailed", "--cpu-percent", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(quota(), "250000", "back to 2 vCPUs' default");
    let refused = d.rpc_raw("vm.set", json!({"vm": "jailed", "cpu_percent": 5}));
    assert!(refused["error"]["message"].as_str().unwrap().contains("between 10 and 3250"), "{refused}");
    let refused = d.rpc_raw("vm.set", json!({"vm": "jailed", "vcpus": 1, "cpu_percent": 50}));
    assert!(
        refused["result"]["results"][0]["error"]["hint"].as_str().unwrap_or("").contains("cpu_percent")
            && next_steps(&refused["result"]["results"][0]["error"])
                == [("vm.stop".to_string(), json!({"vm": "jailed"}))],
        "{refused}"
    );
    assert_eq!(quota(), "250000", "a refused set changes nothing");
    // Both the limit and the uid are the VM's (in the store): a stop and a start keep them.
    d.rpc("vm.set", json!({"vm": "jailed", "cpu_percent": 40}));
    d.rpc("vm.stop", json!({"vm": "jailed"}));
    // Stopped, its folder is the daemon's alone again: nothing the VMM left there is writable by its uid.
    let folder = std::fs::metadata(&own).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((folder.uid(), folder.gid(), folder.mode() & 0o7777), (0, 0, 0o700), "the stopped VM's folder");
    d.rpc("vm.start", json!({"vm": "jailed"}));
    let a = d.rpc("vm.show", json!({"vm": "jailed"}));
    let pid = d.qemu_pid(&a);
    assert_eq!(proc_status(pid, "Uid").split_whitespace().next().unwrap(), uids[0].to_string(), "the VM's uid");
    assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").split_whitespace().next(), Some("40000"));

    // Deleting the VM removes its cgroup and frees its uid's processes.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    d.rpc("vm.delete", json!({"vms": ["jailed", "neighbour"]}));
    d.assert_no_leaked_processes();
    let mem_path = cg.lines().find(|l| l.contains(":memory:")).map(|l| l.splitn(3, ':').nth(2).unwrap().to_string());
    if let Some(p) = mem_path {
        let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/'));
        wait_until("the VM's cgroup is removed", Duration::from_secs(5), || !dir.exists());
    }
}

/// A guest that takes every CPU it has, forks without bound and allocates all its memory is held by its own
/// limits: the daemon and a neighbour VM keep answering.
#[test]
fn a_guest_that_spins_forks_and_allocates_leaves_its_neighbour_answering() {
    let d = TestDaemon::start();
    d.register_test_image();
    let hog = d.rpc("vm.create", json!({"name": "hog", "memory_mib": 256, "vcpus": 2}));
    d.rpc("vm.create", json!({"name": "calm", "memory_mib": 256, "vcpus": 1}));
    let pid = d.qemu_pid(&hog);
    // Busy loops on both vCPUs, a fork bomb and a memory hog, for 40 s at most, in a session that waits for them.
    let script = "for i in 1 2; do timeout 40 sh -c 'while :; do :; done' & done; \
                  timeout 40 sh -c 'b() { b | b & }; b' 2>/dev/null & \
                  timeout 40 sh -c 'x=a; while :; do x=$x$x; done' 2>/dev/null & echo started; wait";
    let r = d.rpc("session.start", json!({"vm": "hog", "name": "hog", "command": ["sh", "-c", script]}));
    assert_eq!(r["state"], "running", "{r}");
    // Let the load build up: the hog's VMM uses its whole CPU quota.
    let ticks = |p: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = ticks(pid);
    wait_until("the hog's VMM burns CPU", Duration::from_secs(20), || ticks(pid) > before + 200);
    let mut times = vec![];
    let during = ticks(pid);
    for _ in 0..5 {
        let t = Instant::now();
        let r = d.rpc("vm.exec", json!({"vm": "calm", "command": ["true"], "timeout_secs": 10}));
        times.push(t.elapsed());
        assert_eq!(r["exit_code"], 0, "{r}");
    }
    // The probes can be quicker than a fifth of a second of the hog's CPU: it is still spinning (not
    // starved or killed) if it burns that much soon after.
    wait_until("the hog to keep spinning after the probes", Duration::from_secs(10), || ticks(pid) > during + 20);
    times.sort();
    assert!(times[2] < Duration::from_secs(1), "the neighbour answers within a second while the hog runs: {times:?}");
    assert!(d.rpc("daemon.ping", json!({})).is_object());
    // The memory hog really filled the guest's RAM (the VMM's cgroup was charged for most of it); the guest's
    // own kernel, not the host's, dealt with it. (A VMM that itself allocates past its limit is killed by
    // it: `contain::jailed::a_process_that_allocates_past_its_limit_is_killed_and_the_host_holds`.)
    let peak = cgroup_file(pid, "memory", "memory.max_usage_in_bytes", "memory.peak").parse::<u64>().unwrap();
    assert!(peak > 128 << 20, "the hog's VMM peaked at {peak} bytes: the hog never allocated");
    d.rpc("vm.delete", json!({"vms": ["hog", "calm"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn doctor_reports_containment_and_warns_when_it_is_turned_off() {
    let d = TestDaemon::start();
    let checks = d.rpc("doctor.run", json!({}))["checks"].clone();
    let named = |checks: &Value, name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {checks}"))
    };
    assert_eq!(named(&checks, "containment")["status"], "pass", "{checks}");
    assert_eq!(named(&checks, "cgroups")["status"], "pass", "{checks}");
    assert!(named(&checks, "qemu sandbox")["detail"].as_str().unwrap().contains("spawn=deny"), "{checks}");
    assert_eq!(named(&checks, "firecracker jailer")["status"], "pass", "{checks}");
    assert_eq!(named(&checks, "seccomp")["status"], "pass", "{checks}");
    assert!(named(&checks, "cgroups")["detail"].as_str().unwrap().contains("memory"), "controllers named: {checks}");
    assert!(named(&checks, "user namespaces")["detail"].as_str().unwrap().contains("do not use them"), "{checks}");
    drop(d);

    let d = TestDaemon::start_with_config("[containment]\nenabled = false");
    let checks = d.rpc("doctor.run", json!({}))["checks"].clone();
    let off = named(&checks, "containment");
    assert_eq!(off["status"], "warn", "{off}");
    assert!(off["fix"].as_str().unwrap().contains("enabled = true"), "{off}");
    d.register_test_image();
    let vm = d.rpc("vm.create", json!({"name": "loose", "memory_mib": 256, "boot": "cold"}));
    let pid = d.qemu_pid(&vm);
    assert_eq!(proc_status(pid, "Uid").split_whitespace().next(), Some("0"));
    let shown = d.rpc("vm.show", json!({"vm": "loose"}));
    assert_eq!(shown["containment"]["contained"], false, "{shown}");
    d.rpc("vm.delete", json!({"vms": ["loose"]}));
    d.assert_no_leaked_processes();
}
