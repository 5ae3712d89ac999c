//! Real guests booted through the daemon (QEMU microvm here; Firecracker on hardware KVM hosts).
use std::time::{Duration, Instant};

use banger_e2e::*;

fn exec(d: &TestDaemon, vm: &str, command: &[&str], extra: Value) -> Value {
    let mut params = json!({"vm": vm, "command": command});
    params.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    d.rpc("vm.exec", params)
}

#[test]
fn create_exec_stop_start_restart_daemon_delete() {
    let mut d = TestDaemon::start();
    d.register_test_image();

    let vm = d.cli_json(&["vm", "create", "--name", "alpha", "--memory", "384"]);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["memory_mib"], 384);
    let pid = vm["pid"].as_u64().expect("running VM has a VMM pid") as u32;

    // exec: exit code, stdout, stderr, env, cwd.
    let r = exec(
        &d,
        "alpha",
        &["sh", "-c", "echo out; echo err >&2; echo $FOO; pwd; hostname; exit 3"],
        json!({"env": {"FOO": "bar"}, "cwd": "/tmp"}),
    );
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stdout"], "out\nbar\n/tmp\nalpha\n");
    assert_eq!(r["stderr"], "err\n");

    // stdin is delivered and closed.
    let r = exec(&d, "alpha", &["sh", "-c", "wc -c; cat >/dev/null"], json!({"stdin": "hello world"}));
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "11");

    // A timeout kills the command (and its children) and says so.
    let started = Instant::now();
    let r = exec(&d, "alpha", &["sh", "-c", "sleep 100 & sleep 100"], json!({"timeout_secs": 2}));
    assert_eq!(r["timed_out"], true);
    assert!(r["exit_code"].is_null() && r["signal"] == 9, "{r}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // Large output arrives whole when asked for: 3 MiB inline, checked by content.
    let big = ["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' 'x'; echo done >&2"];
    let r = exec(&d, "alpha", &big, json!({"max_inline_bytes": 4 << 20}));
    let out = r["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 3 << 20);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(r["stdout_truncated"], false);
    assert!(r["output_id"].is_null(), "nothing was cut, nothing is kept: {}", r["output_id"]);
    // By default a result stays small, says it was cut, and the rest is kept behind a cursor.
    let r = exec(&d, "alpha", &big, json!({}));
    assert_eq!(r["stdout"].as_str().unwrap().len(), 256 << 10);
    assert_eq!((r["stdout_truncated"].as_bool(), r["stdout_bytes"].as_u64()), (Some(true), Some(3 << 20)));
    assert_eq!((r["stderr"].as_str(), r["stderr_truncated"].as_bool()), (Some("done\n"), Some(false)));
    let id = r["output_id"].as_str().expect("a cut result has an output_id").to_string();
    let (mut offset, mut whole) = (256u64 << 10, r["stdout"].as_str().unwrap().to_string());
    loop {
        let chunk = d.rpc(
            "vm.exec_output",
            json!({"vm": "alpha", "output_id": id, "stream": "stdout", "offset": offset, "limit": 1 << 20}),
        );
        whole.push_str(chunk["content"].as_str().unwrap());
        assert_eq!(chunk["total_bytes"], 3u64 << 20);
        match chunk["next_offset"].as_u64() {
            Some(next) => offset = next,
            None => break assert_eq!(chunk["eof"], true),
        }
    }
    assert_eq!(whole.len(), 3 << 20);
    assert!(whole.bytes().all(|b| b == b'x'));
    // A stream that was not cut has nothing kept, and an unknown id is a clear miss.
    let e = d.rpc_raw("vm.exec_output", json!({"vm": "alpha", "output_id": id, "stream": "stderr"}));
    assert_eq!(e["error"]["data"]["code"], "not_found", "{e}");
    // The CLI prints all of it, byte for byte.
    let out = d.cli(&["vm", "exec", "alpha", "--", "sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' 'x'"]);
    assert_eq!(out.stdout.len(), 3 << 20);
    assert!(out.stdout.iter().all(|b| *b == b'x'));

    // A program that does not exist is the caller's mistake, said plainly.
    let e = d.rpc_raw("vm.exec", json!({"vm": "alpha", "command": ["no-such-program"]}));
    assert!(e["error"]["message"].as_str().unwrap().contains("no-such-program"), "{e}");

    // The CLI exits with the command's code.
    let out = d.cli(&["vm", "exec", "alpha", "--", "sh", "-c", "echo via-cli; exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-cli\n");

    // Files written survive stop/start (the copy-on-write root disk persists).
    exec(&d, "alpha", &["sh", "-c", "echo kept > /root/marker && sync"], json!({}));
    let r = d.rpc("vm.stop", json!({"vms": ["alpha"]}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["results"][0]["info"]["state"], "stopped");
    assert!(!process_alive(pid), "VMM {pid} still running after stop");
    let e = d.rpc_raw("vm.exec", json!({"vm": "alpha", "command": ["true"]}));
    assert_eq!(e["error"]["data"]["code"], "failed_precondition", "{e}");
    assert_eq!(next_steps(&e["error"]["data"]), [("vm.start".to_string(), json!({"vm": "alpha"}))], "{e}");

    let r = d.rpc("vm.start", json!({"vms": ["alpha"]}));
    assert_eq!(r["results"][0]["info"]["state"], "running", "{r}");
    assert_eq!(exec(&d, "alpha", &["cat", "/root/marker"], json!({}))["stdout"], "kept\n");

    // The daemon restarts; the running VM is adopted, not lost.
    d.restart();
    assert_eq!(d.rpc("vm.show", json!({"vm": "alpha"}))["state"], "running");
    assert_eq!(exec(&d, "alpha", &["echo", "still here"], json!({}))["stdout"], "still here\n");

    let r = d.rpc("vm.delete", json!({"vms": ["alpha"]}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    d.assert_no_leaked_processes();
    let vm_dirs = std::fs::read_dir(d.state_dir.join("vms")).unwrap().count();
    assert_eq!(vm_dirs, 0, "VM directory left behind");
}

#[test]
fn several_vms_at_once_with_per_vm_results_in_order() {
    let d = TestDaemon::start();
    d.register_test_image();
    for name in ["one", "two"] {
        d.rpc("vm.create", json!({"name": name, "memory_mib": 256}));
    }
    for name in ["one", "two"] {
        assert_eq!(exec(&d, name, &["hostname"], json!({}))["stdout"], format!("{name}\n"));
    }
    // Repeated refs act once; an unknown ref fails alone; order is as given.
    let r = d.rpc("vm.stop", json!({"vms": ["two", "ghost", "one", "two"]}));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["vm"], "two");
    assert_eq!(results[0]["info"]["state"], "stopped");
    assert_eq!(results[1]["vm"], "ghost");
    assert_eq!(results[1]["error"]["code"], "not_found");
    assert_eq!(results[2]["info"]["state"], "stopped");
    assert_eq!(r["ok"], false);
    let out = d.cli(&["vm", "delete", "one", "two"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d.assert_no_leaked_processes();
}

fn wait_for_vmm(d: &TestDaemon) {
    wait_until("the VMM to start", Duration::from_secs(30), || !d.processes_of_this_test().is_empty());
}

fn wait_for_no_vms(d: &TestDaemon, what: &str) {
    wait_until(&format!("{what} to be rolled back"), Duration::from_secs(30), || {
        d.rpc("vm.list", json!({}))["vms"] == json!([])
    });
    d.assert_no_leaked_processes();
    assert_eq!(std::fs::read_dir(d.state_dir.join("vms")).unwrap().count(), 0, "VM directory left behind");
}

#[test]
fn a_json_rpc_client_that_disconnects_mid_create_cancels_it() {
    use std::io::Write;
    let d = TestDaemon::start();
    d.register_test_image();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "vm.create", "params": {"name": "abandoned"}}).to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for_vmm(&d);
    drop(s);
    wait_for_no_vms(&d, "a create whose HTTP client vanished");
}

#[test]
fn operation_cancel_rolls_a_create_back_and_stages_are_reported() {
    let d = TestDaemon::start();
    d.register_test_image();
    let op = d.rpc("vm.create_begin", json!({"name": "halfway"}));
    assert_eq!(op["state"], "running");
    assert_eq!(op["target"], "halfway");
    let names: Vec<&str> = op["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["allocate", "queue", "disks", "network", "boot", "agent", "ready"]);
    wait_for_vmm(&d);
    let status = d.rpc("operation.status", json!({"id": op["id"]}));
    assert_eq!(status["stages"][0]["state"], "done", "{status}");
    let cancelled = d.rpc("operation.cancel", json!({"id": op["id"]}));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["error"]["code"], "cancelled");
    wait_for_no_vms(&d, "a cancelled create");

    // A create that runs to the end reports every stage done, with timings. Followed the way a script
    // would, with `banger operation wait`: each answer comes at the operation's next change, with a higher
    // revision, until it ends.
    let op = d.rpc("vm.create_begin", json!({"name": "whole", "memory_mib": 256}));
    let id = op["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = op["revision"].as_u64().unwrap();
    let done = loop {
        let s = d.cli_json(&["operation", "wait", &id, "--after", &seen.to_string(), "--timeout-ms", "60000"]);
        let revision = s["revision"].as_u64().unwrap();
        if s["state"] != "running" {
            break s;
        }
        assert!(revision > seen, "an answer before any change: {s}");
        seen = revision;
        assert!(Instant::now() < deadline, "{s}");
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["vm"]["state"], "running");
    for stage in done["stages"].as_array().unwrap() {
        assert_eq!(stage["state"], "done", "{done}");
        assert!(stage["duration_ms"].is_u64(), "{done}");
    }
    let listed = d.rpc("operation.list", json!({}));
    assert!(listed["operations"].as_array().unwrap().iter().any(|o| o["id"] == op["id"]));
    d.rpc("vm.delete", json!({"vms": ["whole"]}));
}

#[test]
fn ctrl_c_in_the_cli_cancels_the_create_and_says_so() {
    let d = TestDaemon::start();
    d.register_test_image();
    let cli = std::process::Command::new(bin("banger"))
        .args(["vm", "create", "--name", "interrupted"])
        .env("BANGER_SOCKET", &d.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_vmm(&d);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cli.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = cli.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("allocate") && stderr.contains("cancelled"), "{stderr}");
    wait_for_no_vms(&d, "a create interrupted with Ctrl-C");
}

#[test]
fn vm_create_over_mcp_reports_progress_notifications() {
    let d = TestDaemon::start();
    d.register_test_image();
    let mut m = RawMcp::connect(&d.socket);
    m.initialize();
    m.send_line(
        &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "vm_create", "arguments": {"name": "progressive", "memory_mib": 256},
        "_meta": {"progressToken": "tok-1"}}})
        .to_string(),
    );
    let mut progress = vec![];
    let result = loop {
        let msg = m.recv();
        if msg["method"] == "notifications/progress" {
            assert_eq!(msg["params"]["progressToken"], "tok-1");
            progress.push((
                msg["params"]["progress"].as_f64().unwrap(),
                msg["params"]["message"].as_str().unwrap().to_string(),
            ));
        } else if msg["id"] == 3 {
            break msg;
        }
    };
    assert_eq!(result["result"]["structuredContent"]["state"], "running", "{result}");
    assert!(progress.len() >= 4, "expected a notification per stage: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0), "progress must increase: {progress:?}");
    assert!(progress.iter().any(|(_, m)| m.contains("agent")), "{progress:?}");
    d.rpc("vm.delete", json!({"vms": ["progressive"]}));
}

#[test]
fn a_daemon_killed_mid_create_leaks_nothing_after_restart() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    let mut cli = std::process::Command::new(bin("banger"))
        .args(["vm", "create", "--name", "orphan"])
        .env("BANGER_SOCKET", &d.socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_vmm(&d);
    d.crash_and_restart();
    let _ = cli.wait();
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    d.assert_no_leaked_processes();
    assert_eq!(std::fs::read_dir(d.state_dir.join("vms")).unwrap().count(), 0);
}

#[test]
fn an_mcp_client_that_disconnects_mid_create_cancels_it() {
    let d = TestDaemon::start();
    d.register_test_image();
    let mut m = RawMcp::connect(&d.socket);
    m.initialize();
    m.send_line(
        &json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "vm_create", "arguments": {"name": "mcp-abandoned"}}})
        .to_string(),
    );
    wait_for_vmm(&d);
    drop(m);
    wait_for_no_vms(&d, "a create whose MCP client vanished");
}

#[test]
fn set_changes_shape_of_a_stopped_vm_and_grows_its_disk_and_stats_report_both_views() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "shape", "memory_mib": 256}));
    let s = d.rpc("vm.stats", json!({"vm": "shape"}));
    assert!(s["host_rss_bytes"].as_u64().unwrap() > 10 << 20, "{s}");
    assert!(s["guest"]["mem_total_bytes"].as_u64().unwrap() > 128 << 20, "{s}");
    assert!(s["guest"]["processes"].as_u64().unwrap() >= 2, "{s}");
    let root_before = s["guest"]["root_total_bytes"].as_u64().unwrap();
    // /root is the VM's own work disk, cloned from the image's work seed.
    let work = |d: &TestDaemon| {
        let r = d.rpc("vm.exec", json!({"vm": "shape", "command": ["sh", "-c", "mountpoint -q /root && findfs LABEL=banger-work && df -B1 --output=size /root | tail -1"]}));
        assert_eq!(r["exit_code"], 0, "/root is not the work disk: {r}");
        r["stdout"].as_str().unwrap().lines().last().unwrap().trim().parse::<u64>().unwrap()
    };
    let work_before = work(&d);
    d.rpc("vm.exec", json!({"vm": "shape", "command": ["sh", "-c", "echo mine > /root/own-file"]}));

    // Running VMs cannot change shape; the error says how.
    let r = d.rpc("vm.set", json!({"vms": ["shape"], "vcpus": 2}));
    assert_eq!(r["results"][0]["error"]["code"], "failed_precondition", "{r}");
    assert_eq!(next_steps(&r["results"][0]["error"]), [("vm.stop".to_string(), json!({"vm": "shape"}))], "{r}");

    // Bad values are refused before anything changes, at the daemon and in the CLI.
    let e = d.rpc_raw("vm.set", json!({"vms": ["shape"], "memory_mib": 64}));
    assert!(e["error"]["message"].as_str().unwrap().contains("memory_mib must be between"), "{e}");
    let e = d.rpc_raw("vm.set", json!({"vms": ["shape"]}));
    assert!(e["error"]["message"].as_str().unwrap().contains("nothing to change"), "{e}");
    let out = d.cli(&["vm", "set", "shape", "--vcpus", "0"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects it: {}", String::from_utf8_lossy(&out.stderr));

    d.rpc("vm.stop", json!({"vms": ["shape"]}));
    let e = d.rpc("vm.set", json!({"vms": ["shape"], "disk_gib": 1}));
    assert_eq!(e["results"][0]["error"]["code"], "invalid_argument", "disks only grow: {e}");
    let r =
        d.rpc("vm.set", json!({"vms": ["shape"], "vcpus": 2, "memory_mib": 384, "disk_gib": 3, "work_disk_gib": 2}));
    assert_eq!(r["ok"], true, "{r}");
    let info = &r["results"][0]["info"];
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 384);
    assert_eq!(info["disk_bytes"], 3u64 << 30);
    assert_eq!(info["work_disk_bytes"], 2u64 << 30);

    d.rpc("vm.start", json!({"vms": ["shape"]}));
    let nproc = d.rpc("vm.exec", json!({"vm": "shape", "command": ["nproc"]}));
    assert_eq!(nproc["stdout"], "2\n");
    let s = d.rpc("vm.stats", json!({"vm": "shape"}));
    let root_after = s["guest"]["root_total_bytes"].as_u64().unwrap();
    assert!(root_after > root_before + (512 << 20), "the filesystem grew with the disk: {root_before} -> {root_after}");
    let work_after = work(&d);
    assert!(work_after > work_before + (512 << 20), "/root grew with its disk: {work_before} -> {work_after}");
    assert_eq!(d.rpc("vm.exec", json!({"vm": "shape", "command": ["cat", "/root/own-file"]}))["stdout"], "mine\n");
    // Another VM of the same image gets its own /root, without the first VM's files.
    d.rpc("vm.create", json!({"name": "other", "memory_mib": 256}));
    let r = d.rpc("vm.exec", json!({"vm": "other", "command": ["test", "-e", "/root/own-file"]}));
    assert_eq!(r["exit_code"], 1, "work disks must not be shared: {r}");
    d.rpc("vm.delete", json!({"vms": ["other"]}));
    d.rpc("vm.delete", json!({"vms": ["shape"]}));
}

#[test]
fn restart_reboots_and_a_daemon_killed_with_vms_running_adopts_them() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "phoenix", "memory_mib": 256}));
    let boot_id = |d: &TestDaemon| {
        d.rpc("vm.exec", json!({"vm": "phoenix", "command": ["cat", "/proc/sys/kernel/random/boot_id"]}))["stdout"]
            .clone()
    };
    let first = boot_id(&d);
    let r = d.rpc("vm.restart", json!({"vms": ["phoenix"]}));
    assert_eq!(r["results"][0]["info"]["state"], "running", "{r}");
    let second = boot_id(&d);
    assert_ne!(first, second, "restart must reboot the guest");

    let pid = d.rpc("vm.show", json!({"vm": "phoenix"}))["pid"].clone();
    d.crash_and_restart();
    let vm = d.rpc("vm.show", json!({"vm": "phoenix"}));
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"], pid, "the same VMM was adopted, not a new one");
    assert_eq!(boot_id(&d), second, "the guest kept running through the daemon crash");
    // Its network came back with it: the name resolves again.
    let out = d.netns.exec(&["getent", "hosts", "phoenix.vm"]);
    assert!(out.status.success(), "phoenix.vm does not resolve after the daemon crash");
    d.rpc("vm.delete", json!({"vms": ["phoenix"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn bench_prints_numbers_for_cold_warm_and_the_bare_vmm() {
    let d = TestDaemon::start();
    d.register_test_image();
    // In the test's namespace: the bench's bare VM gets a NIC, whose TAP must not appear on the host.
    let socket = format!("BANGER_SOCKET={}", d.socket.display());
    let banger = bin("banger");
    let args = ["bench", "--runs", "1", "--execs", "3", "--memory", "256", "--payload-mib", "1", "--json"];
    let mut cmd = vec!["env", socket.as_str(), banger.to_str().unwrap()];
    cmd.extend_from_slice(&args);
    let out = d.netns.exec(&cmd);
    assert!(out.status.success(), "banger bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    // Numbers are printed, not judged: only their presence and sanity are checked.
    for key in [
        "cold_create_to_ready",
        "warm_create_to_ready",
        "bare_vmm_boot_to_ready",
        "noop_exec_via_daemon",
        "noop_exec_direct",
        "raw_channel_echo",
    ] {
        assert!(r[key]["p50_ms"].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    assert_eq!(r["noop_exec_via_daemon"]["n"], 3);
    assert!(r.get("pool_create_to_ready").is_none(), "no pool is configured: {r}");
    for key in ["cold_over_bare", "warm_over_cold"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    for key in ["idle_cold_vm", "idle_warm_vm"] {
        assert!(r[key]["rss_mib"].as_f64().unwrap() > 10.0, "{key}: {r}");
    }
    for key in ["workspace_prepare_mib_s", "workspace_export_mib_s", "raw_channel_write_mib_s"] {
        assert!(r["throughput"][key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]), "bench leaves no VM behind");
    d.assert_no_leaked_processes();
}

#[test]
fn guests_are_managed_over_vsock_too() {
    // The hybrid-vsock path Firecracker uses, exercised under QEMU through vhost-device-vsock.
    let mut d = TestDaemon::start_with_config("qemu_channel = \"vsock\"");
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "socky", "memory_mib": 256}));
    // The host connected only after the agent said it listens (a connection taken earlier can hang).
    assert!(d.daemon_output().contains("the vsock agent announced it listens"), "{}", d.daemon_output());
    assert!(!d.state_dir.join("vms").read_dir().unwrap().flatten().any(|v| v.path().join("vsock.sock_1025").exists()));
    let cmdline = d.rpc("vm.exec", json!({"vm": "socky", "command": ["cat", "/proc/cmdline"]}));
    assert!(cmdline["stdout"].as_str().unwrap().contains("banger.channel=vsock"), "{cmdline}");
    let r = d.rpc("vm.exec", json!({"vm": "socky", "command": ["sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' v | wc -c"], "stdin": "ignored"}));
    assert_eq!(r["stdout"], "2000000\n");
    let helper: Vec<u32> = d
        .processes_of_this_test()
        .into_iter()
        .filter(|(_, c)| c.contains("vhost-device-vsock"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(helper.len(), 1, "helper runs");
    // Contained like its VMM, and under banger's seccomp filter (it brings none of its own).
    let status = std::fs::read_to_string(format!("/proc/{}/status", helper[0])).unwrap();
    for want in ["Seccomp:	2", "NoNewPrivs:	1", "CapEff:	0000000000000000"] {
        assert!(
            status.contains(want),
            "{want} missing from the helper's status:
{status}"
        );
    }
    d.rpc("vm.stop", json!({"vms": ["socky"]}));
    assert!(
        !d.processes_of_this_test().iter().any(|(_, c)| c.contains("vhost-device-vsock")),
        "helper ends with its VM"
    );
    d.rpc("vm.start", json!({"vms": ["socky"]}));
    d.restart();
    assert_eq!(d.rpc("vm.exec", json!({"vm": "socky", "command": ["echo", "reconnected"]}))["stdout"], "reconnected\n");
    d.rpc("vm.delete", json!({"vms": ["socky"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn files_round_trip_binary_and_large_with_modes_and_clear_errors() {
    use std::os::unix::fs::PermissionsExt;
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "filer", "memory_mib": 256}));

    // Text through the API, parent directories made, mode set.
    let w = d.rpc(
        "vm.file_write",
        json!({"vm": "filer", "path": "/root/a/b/hello.sh", "content": "#!/bin/sh\necho hi\n", "mode": "0755"}),
    );
    assert_eq!(w["bytes"], 18);
    let r = d.rpc("vm.exec", json!({"vm": "filer", "command": ["/root/a/b/hello.sh"]}));
    assert_eq!(r["stdout"], "hi\n", "the mode made it executable: {r}");
    let back = d.rpc("vm.file_read", json!({"vm": "filer", "path": "/root/a/b/hello.sh"}));
    assert_eq!(back["content"], "#!/bin/sh\necho hi\n");
    assert_eq!(back["encoding"], "text");
    assert_eq!(back["mode"], "0755");
    assert_eq!(back["eof"], true);
    // Binary comes back as base64; a partial read says where to go on.
    d.rpc("vm.file_write", json!({"vm": "filer", "path": "/root/bin", "content": "AP8BgA==", "encoding": "base64"}));
    let part = d.rpc("vm.file_read", json!({"vm": "filer", "path": "/root/bin", "limit": 2}));
    assert_eq!(part["encoding"], "base64");
    assert_eq!(part["content"], "AP8=");
    assert_eq!(part["eof"], false);
    assert_eq!(part["next_offset"], 2);

    let e = d.rpc_raw("vm.file_read", json!({"vm": "filer", "path": "/no/such/file"}));
    assert_eq!(e["error"]["data"]["code"], "not_found", "{e}");
    let e = d.rpc_raw("vm.file_write", json!({"vm": "filer", "path": "relative.txt", "content": "x"}));
    assert!(e["error"]["message"].as_str().unwrap().contains("must be absolute"), "{e}");
    let e = d.rpc_raw("vm.file_write", json!({"vm": "filer", "path": "/root/x", "content": "x", "mode": "999"}));
    assert!(e["error"]["message"].as_str().unwrap().contains("not octal"), "{e}");

    // 20 MiB of random bytes up and back down with `banger vm cp` (several chunks each way).
    let src = d.dir.path().join("blob");
    let data: Vec<u8> = (0..(20 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    let up = d.cli_json(&["vm", "cp", src.to_str().unwrap(), "filer:/root/blob"]);
    assert_eq!(up["bytes"], 20u64 << 20);
    let sum = d.rpc("vm.exec", json!({"vm": "filer", "command": ["sha256sum", "/root/blob"]}));
    assert!(
        sum["stdout"].as_str().unwrap().starts_with(up["sha256"].as_str().unwrap()),
        "guest checksum {sum} vs {up}"
    );
    let dst = d.dir.path().join("blob.back");
    let down = d.cli_json(&["vm", "cp", "filer:/root/blob", dst.to_str().unwrap()]);
    assert_eq!(down["sha256"], up["sha256"]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    assert_eq!(std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777, 0o750, "mode kept both ways");
    d.rpc("vm.delete", json!({"vms": ["filer"]}));
}

#[test]
fn a_vmm_that_fails_to_start_leaves_no_helper_process_or_vm_behind() {
    // QEMU refuses a kernel that is not one, after the vsock helper for the VM is already running.
    let d = TestDaemon::start_with_config("qemu_channel = \"vsock\"");
    let img = test_image();
    let bogus = d.dir.path().join("not-a-kernel");
    std::fs::write(&bogus, vec![0u8; 4096]).unwrap();
    d.rpc(
        "image.register",
        // With an initramfs, QEMU checks the kernel's header at start and refuses a kernel that is not one.
        json!({"name": "broken", "kernel": bogus.display().to_string(), "initrd": std::env::var("BANGER_TEST_CLOUD_INITRD").unwrap(),
        "rootfs": img.rootfs, "work_seed": img.work_seed}),
    );
    let e = d.rpc_raw("vm.create", json!({"name": "doomed", "image": "broken"}));
    assert!(e["error"]["message"].as_str().unwrap().contains("starting qemu failed"), "{e}");
    assert!(e["error"]["data"]["hint"].is_string(), "the error says what to do next: {e}");
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]), "the failed create was rolled back");
    d.assert_no_leaked_processes();
    assert_eq!(std::fs::read_dir(d.state_dir.join("vms")).unwrap().count(), 0);
}
