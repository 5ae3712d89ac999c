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

    // Large output arrives whole: 3 MiB, checked by content.
    let r = exec(&d, "alpha", &["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' 'x'"], json!({}));
    let out = r["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 3 << 20);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(r["stdout_truncated"], false);

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
    assert!(e["error"]["data"]["hint"].as_str().unwrap().contains("banger vm start alpha"));

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

#[test]
fn a_create_whose_caller_disconnects_is_rolled_back() {
    let d = TestDaemon::start();
    d.register_test_image();
    let mut cli = std::process::Command::new(bin("banger"))
        .args(["vm", "create", "--name", "abandoned"])
        .env("BANGER_SOCKET", &d.socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the VM is mid-boot (its VMM runs), then kill the client like a Ctrl-C would.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.processes_of_this_test().is_empty() {
        assert!(Instant::now() < deadline, "the VMM never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vms = d.rpc("vm.list", json!({}))["vms"].clone();
        if vms == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "abandoned create was not rolled back: {vms}");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.assert_no_leaked_processes();
    assert_eq!(std::fs::read_dir(d.state_dir.join("vms")).unwrap().count(), 0);
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.processes_of_this_test().is_empty() {
        assert!(Instant::now() < deadline, "the VMM never started");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.processes_of_this_test().is_empty() {
        assert!(Instant::now() < deadline, "the VMM never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(m);
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.rpc("vm.list", json!({}))["vms"] != json!([]) {
        assert!(Instant::now() < deadline, "abandoned MCP create was not rolled back");
        std::thread::sleep(Duration::from_millis(100));
    }
    d.assert_no_leaked_processes();
}
