//! Under load (issue 24): many creates at once (cold, template and pool), hundreds of execs, streaming
//! sessions and a daemon SIGKILL in the middle, then deletes. Every call succeeds or fails with a typed,
//! retryable error that names why; nothing is leaked and the store agrees with the host. And from the CLI:
//! 20 concurrent creates succeed, and with a low memory limit the excess is refused before anything is made.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use banger_e2e::*;
use serde_json::{json, Value};

const VMS: usize = 20;
const EXECS: usize = 200;
const SESSIONS: usize = 10;

/// Codes a caller may retry: they say the host or guest was busy, not that the request was wrong.
const RETRYABLE: &[&str] = &["busy", "resource_exhausted", "guest_unreachable", "timeout"];

/// 256 MiB guests, 20 of them within the budget; a pool of two of the default shape.
fn load_config() -> String {
    "default_memory_mib = 256\n[limits]\nmemory_overcommit_ratio = 1.0\nmax_concurrent_creates = 4\n\
     [warm]\nauto_build = false\npool_size = 2\n"
        .into()
}

/// A call's outcome: Ok(result), or Err(code) for a typed error whose code is retryable. Anything else
/// (an untyped failure, a non-retryable code, a message that names nothing) fails the test.
fn call(d: &TestDaemon, method: &str, params: Value) -> Result<Value, String> {
    let r = d.rpc_raw(method, params.clone());
    if let Some(v) = r.get("result") {
        return Ok(v.clone());
    }
    let data = &r["error"]["data"];
    let code = data["code"].as_str().unwrap_or_else(|| panic!("{method} failed without a typed error: {r}"));
    let message = data["message"].as_str().unwrap_or_default();
    assert!(RETRYABLE.contains(&code), "{method} {params} failed with a non-retryable error: {r}");
    assert!(message.len() > 10, "{method}: the error names no reason: {r}");
    Err(code.to_string())
}

/// `call`, retried (up to 5 times, after a typed retryable error only) until it succeeds. Returns the result
/// and how many retries it took.
fn call_until_ok(d: &TestDaemon, method: &str, params: Value) -> (Value, u32) {
    let mut retries = 0;
    loop {
        match call(d, method, params.clone()) {
            Ok(v) => return (v, retries),
            Err(code) => {
                eprintln!("load: {method} retried after `{code}`");
                retries += 1;
                assert!(retries <= 5, "{method} {params}: still `{code}` after 5 retries");
                std::thread::sleep(Duration::from_millis(200 * retries as u64));
            }
        }
    }
}

fn nft_table(d: &TestDaemon) -> String {
    String::from_utf8_lossy(&d.netns.exec(&["nft", "list", "table", "inet", "banger"]).stdout).to_string()
}

fn resolves(d: &TestDaemon, name: &str) -> bool {
    d.netns.exec(&["getent", "hosts", &format!("{name}.vm")]).status.success()
}

/// Runs `f(i)` for i in 0..n on n threads at once; returns the results in order.
fn all_at_once<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    })
}

#[test]
fn load_creates_execs_sessions_and_a_daemon_crash_leave_nothing_behind() {
    let started = Instant::now();
    let mut d = TestDaemon::start_with_config(&load_config());
    d.register_test_image();
    d.rpc("image.warm", json!({}));
    wait_until("the warm pool is full", Duration::from_secs(180), || {
        d.rpc("daemon.status", json!({}))["warm_pool"]["ready"] == 2
    });

    // 20 creates at once: every third cold, every third from the template, the rest may take the pool; some
    // with NAT so nftables rules come and go.
    let boots = ["cold", "template", "auto"];
    let created = all_at_once(VMS, |i| {
        let params = json!({"name": format!("load-{i}"), "boot": boots[i % 3], "nat": i % 5 == 0});
        call_until_ok(&d, "vm.create", params)
    });
    let mut modes: Vec<String> = vec![];
    for (vm, _) in &created {
        assert_eq!(vm["state"], "running", "{vm}");
        modes.push(vm["boot"]["mode"].as_str().unwrap().to_string());
    }
    for m in ["cold", "warm", "pool"] {
        assert!(modes.iter().any(|x| x == m), "no {m} create among {modes:?}");
    }
    let create_retries: u32 = created.iter().map(|(_, r)| r).sum();
    let ips: HashSet<String> = created.iter().map(|(v, _)| v["ip"].as_str().unwrap().to_string()).collect();
    assert_eq!(ips.len(), VMS, "two VMs share an address");
    let status = d.rpc("daemon.status", json!({}));
    assert!(status["limits"]["memory_promised_mib"].as_u64().unwrap() >= (VMS as u64) * 256, "{status}");

    // 200 execs at once over the 20 VMs: each VM's own MAC and hostname come back.
    let names: Vec<String> = (0..VMS).map(|i| format!("load-{i}")).collect();
    let execs = |d: &TestDaemon, round: &str| {
        all_at_once(EXECS, |i| {
            let vm = &names[i % VMS];
            let script = format!("echo {round}-{i}; cat /sys/class/net/eth0/address; hostname");
            let (r, retries) =
                call_until_ok(d, "vm.exec", json!({"vm": vm, "command": ["sh", "-c", script], "timeout_secs": 120}));
            assert_eq!(r["exit_code"], 0, "{vm}: {r}");
            let out = r["stdout"].as_str().unwrap().to_string();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 3, "{vm}: {out}");
            assert_eq!((lines[0], lines[2]), (format!("{round}-{i}").as_str(), vm.as_str()), "{vm}: {out}");
            (vm.clone(), lines[1].to_string(), retries)
        })
    };
    let before = execs(&d, "before");
    let mut mac_of = std::collections::HashMap::new();
    for (vm, mac, _) in &before {
        assert_eq!(mac_of.entry(vm.clone()).or_insert_with(|| mac.clone()), mac, "{vm} changed its MAC");
    }
    let macs: HashSet<&String> = mac_of.values().collect();
    assert_eq!(macs.len(), VMS, "two VMs share a MAC: {mac_of:?}");

    // 10 sessions stream output (in the guests); the daemon is SIGKILLed while they do.
    let script = "for i in $(seq 1 150); do echo line-$i; sleep 0.04; done";
    let sessions: Vec<String> = (0..SESSIONS)
        .map(|i| {
            let s = d.rpc("session.start", json!({"vm": names[i], "command": ["sh", "-c", script]}));
            s["id"].as_str().unwrap().to_string()
        })
        .collect();
    d.crash_and_restart();

    // After the restart, another 200 execs. (The first burst after a restart hitting the guest channel's
    // reconnect is what the guest-channel fix addresses; a typed `guest_unreachable`/`timeout` retry here is
    // counted and reported, an untyped failure fails the test.)
    let after = execs(&d, "after");
    for (vm, mac, _) in &after {
        assert_eq!(&mac_of[vm], mac, "{vm}'s MAC changed across the daemon restart");
    }
    let retries_before: u32 = before.iter().map(|(_, _, r)| r).sum();
    let retries_after: u32 = after.iter().map(|(_, _, r)| r).sum();

    // Every session's output is whole and in order.
    let expected: String = (1..=150).map(|i| format!("line-{i}\n")).collect();
    for id in &sessions {
        wait_until("the session ends", Duration::from_secs(120), || {
            d.rpc("session.show", json!({"session": id}))["state"] != "running"
        });
        let mut text = String::new();
        let mut cursor = 0u64;
        loop {
            let r = d.rpc("session.logs", json!({"session": id, "from": cursor}));
            for c in r["chunks"].as_array().unwrap() {
                assert_eq!(c["offset"], cursor, "chunks are contiguous");
                let data = c["data"].as_str().unwrap();
                cursor += data.len() as u64;
                text.push_str(data);
            }
            if r["more"] == false {
                break;
            }
        }
        assert_eq!(text, expected, "session {id}");
        assert_eq!(d.rpc("session.show", json!({"session": id}))["state"], "exited");
    }

    // The store agrees with the host: every recorded VM runs, under its marker, on its own TAP.
    let list = d.rpc("vm.list", json!({}));
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), VMS, "{list}");
    for vm in vms {
        assert_eq!(vm["state"], "running", "{vm}");
        assert!(process_alive(vm["pid"].as_u64().unwrap() as u32), "{vm}");
        assert!(resolves(&d, vm["name"].as_str().unwrap()), "{} does not resolve", vm["name"]);
    }
    let ids: Vec<String> = vms.iter().map(|v| v["id"].as_str().unwrap().to_string()).collect();

    // Deletes, all at once.
    let deleted = all_at_once(VMS, |i| call_until_ok(&d, "vm.delete", json!({"vms": [names[i]]})));
    for (r, _) in &deleted {
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    for n in &names {
        assert!(!resolves(&d, n), "{n}.vm still resolves after delete");
    }
    let table = nft_table(&d);
    for ip in &ips {
        assert!(
            !table.contains(&format!("{ip} ")) && !table.contains(&format!("{ip}\n")),
            "rule for {ip} left:\n{table}"
        );
    }
    // No deleted VM's VMM or directory is left; what still runs is the refilled pool.
    for id in &ids {
        let marker = format!("banger-vm-{id}");
        assert!(
            !d.processes_of_this_test().iter().any(|(_, cmd)| cmd.contains(&marker)),
            "VM {id}'s VMM outlived its delete"
        );
        assert!(!d.state_dir.join("vms").join(id).exists(), "VM {id}'s directory is left");
    }
    // A clean stop ends the pool too: then nothing of this test runs, no VM directory is left, and the
    // only TAPs are the idle TAP pool (network.tap_pool, 2 by default), enslaved to nothing in use.
    d.stop();
    d.assert_no_leaked_processes();
    let leftover: Vec<_> = std::fs::read_dir(d.state_dir.join("vms")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leftover.is_empty(), "VM directories left: {leftover:?}");
    assert!(d.taps().len() <= 2, "TAPs left beyond the idle pool: {:?}", d.taps());
    eprintln!(
        "load test: {VMS} creates ({modes:?}, {create_retries} retries), {} execs (typed retries: \
         {retries_before} before the SIGKILL, {retries_after} after), {SESSIONS} sessions, one SIGKILL; {:.1} s",
        2 * EXECS,
        started.elapsed().as_secs_f64()
    );
}

/// `banger vm create` from the CLI, `n` at once, with extra flags; returns (exit ok, stdout, stderr).
fn cli_creates(d: &TestDaemon, n: usize, prefix: &str, flags: &[&str]) -> Vec<(bool, String, String)> {
    all_at_once(n, |i| {
        let name = format!("{prefix}-{i}");
        let mut args = vec!["vm", "create", "--name", &name];
        args.extend_from_slice(flags);
        args.push("--json");
        let out = d.cli(&args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    })
}

#[test]
fn twenty_concurrent_cli_creates_succeed_and_a_low_limit_refuses_the_excess_before_anything_is_made() {
    // 20 at once from the CLI, restored from a template (the pool is off), all succeed.
    let d = TestDaemon::start_with_config(
        "default_memory_mib = 256\n[limits]\nmax_concurrent_creates = 4\n[warm]\nauto_build = false\npool_size = 0\n",
    );
    d.register_test_image();
    d.rpc("image.warm", json!({}));
    let results = cli_creates(&d, VMS, "cli", &[]);
    for (ok, out, err) in &results {
        assert!(ok, "a CLI create failed: {out}{err}");
    }
    let list = d.rpc("vm.list", json!({}));
    assert_eq!(list["vms"].as_array().unwrap().len(), VMS, "{list}");
    let names: Vec<String> = (0..VMS).map(|i| format!("cli-{i}")).collect();
    let r = d.rpc("vm.delete", json!({"vms": names}));
    assert_eq!(r["ok"], true, "{r}");
    d.assert_no_leaked_processes();
    drop(d);

    // A budget of 600 MiB: two 256 MiB VMs fit, the other four are refused with the numbers, and nothing of
    // theirs exists (no record, no directory, no TAP beyond the idle pool, no VMM).
    let d = TestDaemon::start_with_config(
        "default_memory_mib = 256\n[limits]\nmemory_mib = 600\n[warm]\nauto_build = false\npool_size = 0\n",
    );
    d.register_test_image();
    let status = d.rpc("daemon.status", json!({}));
    assert_eq!(status["limits"]["memory_budget_mib"], 600, "{status}");
    let taps_before = d.taps().len();
    let results = cli_creates(&d, 6, "tight", &["--boot", "cold"]);
    let ok = results.iter().filter(|r| r.0).count();
    assert_eq!(ok, 2, "{results:?}");
    for (_, out, err) in results.iter().filter(|r| !r.0) {
        let text = format!("{out}{err}");
        assert!(text.contains("resource_exhausted"), "{text}");
        assert!(text.contains("needs 256 MiB") && text.contains("of the 600 MiB"), "no numbers: {text}");
        assert!(text.contains("[limits]"), "no hint: {text}");
    }
    let list = d.rpc("vm.list", json!({}));
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{list}");
    let dirs = std::fs::read_dir(d.state_dir.join("vms")).unwrap().count();
    assert_eq!(dirs, 2, "a refused create left a directory");
    assert_eq!(d.processes_of_this_test().iter().filter(|(_, c)| c.contains("banger-vm-")).count(), 2);
    assert!(d.taps().len() <= taps_before.max(2) + 2, "refused creates made TAPs: {:?}", d.taps());
    // doctor says there is no room left.
    let doctor = d.rpc("doctor.run", json!({}));
    let capacity = doctor["checks"].as_array().unwrap().iter().find(|c| c["name"] == "capacity").cloned();
    assert_eq!(capacity.as_ref().map(|c| c["status"].clone()), Some(json!("warn")), "{doctor}");
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(d.rpc("vm.delete", json!({"vms": names}))["ok"], true);
    d.assert_no_leaked_processes();
}

#[test]
fn bench_load_reports_rates_latencies_memory_and_no_failures() {
    let d = TestDaemon::start_with_config("[limits]\nmax_concurrent_creates = 4\n");
    d.register_test_image();
    // In the test's namespace: the bench's bare VM gets a NIC, whose TAP must not appear on the host.
    let socket = format!("BANGER_SOCKET={}", d.socket.display());
    let banger = bin("banger");
    let args =
        ["bench", "--runs", "1", "--execs", "10", "--memory", "256", "--payload-mib", "1", "--load", "10", "--json"];
    let mut cmd = vec!["env", socket.as_str(), banger.to_str().unwrap()];
    cmd.extend_from_slice(&args);
    let out = d.netns.exec(&cmd);
    assert!(out.status.success(), "banger bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    eprintln!("bench --load 10: {}", serde_json::to_string_pretty(&r).unwrap());
    let l = &r["load"];
    assert_eq!(l["failures"], 0, "{l}");
    assert_eq!(
        (l["concurrency"].clone(), l["create_to_ready"]["n"].clone(), l["exec"]["n"].clone()),
        (json!(10), json!(10), json!(100))
    );
    for key in ["creates_per_s", "execs_per_s", "host_memory_per_vm_mib"] {
        assert!(l[key].as_f64().is_some(), "{key}: {l}");
    }
    assert!(l["create_to_ready"]["p99_ms"].as_f64().unwrap() >= l["create_to_ready"]["p50_ms"].as_f64().unwrap());
    assert!(l["idle_vm_at_n"]["rss_mib"].as_f64().unwrap() > 10.0, "{l}");
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]), "the bench deletes its VMs");
    d.assert_no_leaked_processes();
}
