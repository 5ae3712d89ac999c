//! Attacks from a hostile guest on the daemon's end of the guest channel (issue 15, findings 4, 5 and 9),
//! and the channel after a daemon restart (issue 14, item 6). Most replace the guest's agent with the fake
//! agent (`tests/fake-agent`, installed by `TestDaemon::install_fake_agent`): the guest is root, so it can.
use std::time::{Duration, Instant};

use banger_e2e::*;

fn vm_with_fake_agent(d: &TestDaemon, name: &str, behaviours: Value) {
    d.register_test_image();
    let vm = d.cli_json(&["vm", "create", "--name", name, "--memory", "384"]);
    assert_eq!(vm["state"], "running");
    // Installed well-behaved (the harness checks it took over with an exec), then told how to misbehave.
    d.install_fake_agent(name, json!({}));
    d.set_fake_agent(name, behaviours);
}

/// A git repository on the host, made by `script` run in it after `git init`.
fn host_repo(script: &str) -> tempfile::TempDir {
    let repo = tempfile::Builder::new().prefix("banger-repo-").tempdir().unwrap();
    let git = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("git init -q -b main . && {script}"))
        .current_dir(repo.path())
        .output()
        .unwrap();
    assert!(git.status.success(), "{}", String::from_utf8_lossy(&git.stderr));
    repo
}

fn error_of(r: &Value) -> Value {
    r.get("error").cloned().unwrap_or_else(|| panic!("expected an error, got {r}"))
}

/// Bytes the daemon has logged so far (its log file and its captured output).
fn logged_bytes(d: &TestDaemon) -> u64 {
    let size = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    size(d.state_dir.join("bangerd.log")) + size(d.dir.path().join("bangerd.out"))
}

#[test]
fn attack_read_file_flood_is_cut_at_the_bytes_asked_for() {
    let d = TestDaemon::start();
    // Every ReadFile is answered with 200 MiB of data, whatever was asked for.
    vm_with_fake_agent(&d, "flood", json!({"read_file": "flood:209715200"}));
    let before = d.daemon_peak_rss();
    let r = d.rpc_raw("vm.file_read", json!({"vm": "flood", "path": "/etc/hostname", "limit": 4096}));
    let e = error_of(&r);
    assert!(e["message"].as_str().unwrap().contains("more file data than the 4096 bytes"), "{e}");
    let grown = d.daemon_peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "the daemon's peak memory grew by {grown} bytes for a 4 KiB read");
    // The VM's channel still serves calls (the rest of the flood was dropped, not queued).
    d.set_fake_agent("flood", json!({}));
    wait_until("the channel to serve again", Duration::from_secs(60), || {
        d.rpc_raw("vm.exec", json!({"vm": "flood", "command": ["true"], "timeout_secs": 10}))["result"]["exit_code"]
            == 0
    });
}

#[test]
fn attack_guest_that_never_answers_cannot_wedge_kill_delete_or_cancel() {
    let mut d = TestDaemon::start();
    vm_with_fake_agent(&d, "wedge", json!({}));
    let repo = host_repo("git -c user.name=a -c user.email=a@b commit -q --allow-empty -m one");
    // From now on the guest never answers a file write: a prepare hangs in its transfer, holding the VM lock.
    d.set_fake_agent("wedge", json!({"write_file": "silent"}));
    let prepare = |d: &TestDaemon| {
        let (socket, path) = (d.socket.clone(), repo.path().display().to_string());
        std::thread::spawn(move || {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "workspace.prepare",
                              "params": {"vm": "wedge", "path": path}})
            .to_string();
            http_post(&socket, &body).map(|(_, text)| text).unwrap_or_default()
        })
    };
    let running_prepare = |d: &TestDaemon| {
        d.rpc("operation.list", json!({}))["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["state"] == "running" && o["kind"].as_str().unwrap_or("").contains("prepare"))
            .cloned()
    };
    let hung = prepare(&d);
    let mut op = None;
    wait_until("the prepare to be under way", Duration::from_secs(60), || {
        op = running_prepare(&d);
        op.as_ref().is_some_and(|o| {
            o["stages"].as_array().unwrap().iter().any(|s| s["name"] == "transfer" && s["state"] == "running")
        })
    });
    // operation.cancel ends it promptly (the write honours the cancellation), and the VM still works.
    let started = Instant::now();
    let done = d.rpc("operation.cancel", json!({"id": op.unwrap()["id"]}));
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(started.elapsed() < Duration::from_secs(15), "cancel took {:?}", started.elapsed());
    let answer = hung.join().unwrap();
    assert!(answer.contains("cancel"), "{answer}");

    // Again, and this time kill the VM while the prepare holds its lock: kill and delete return promptly.
    let hung = prepare(&d);
    wait_until("the second prepare to be under way", Duration::from_secs(60), || running_prepare(&d).is_some());
    let pid = d.rpc("vm.show", json!({"vm": "wedge"}))["pid"].as_u64().unwrap() as u32;
    let started = Instant::now();
    let killed = d.rpc("vm.kill", json!({"vms": ["wedge"]}));
    assert_eq!(killed["ok"], true, "{killed}");
    assert!(started.elapsed() < Duration::from_secs(15), "kill took {:?}", started.elapsed());
    assert!(!process_alive(pid), "the VMM outlived vm.kill");
    let answer = hung.join().unwrap();
    assert!(answer.contains("\"error\""), "the wedged prepare must fail: {answer}");
    let started = Instant::now();
    let deleted = d.rpc("vm.delete", json!({"vms": ["wedge"]}));
    assert_eq!(deleted["ok"], true, "{deleted}");
    assert!(started.elapsed() < Duration::from_secs(15), "delete took {:?}", started.elapsed());
    assert_eq!(d.rpc("vm.list", json!({}))["vms"].as_array().map(Vec::len), Some(0));
    let left: Vec<_> = std::fs::read_dir(d.state_dir.join("vms")).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    d.assert_no_leaked_processes();
    d.restart();
}

#[test]
fn attack_kill_and_delete_preempt_a_vm_whose_guest_never_answers_writes() {
    let d = TestDaemon::start();
    vm_with_fake_agent(&d, "mute", json!({"write_file": "silent"}));
    // A plain file write that is never answered.
    let socket = d.socket.clone();
    let hung = std::thread::spawn(move || {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "vm.file_write",
                          "params": {"vm": "mute", "path": "/root/x", "content": "x"}})
        .to_string();
        http_post(&socket, &body).map(|(_, text)| text).unwrap_or_default()
    });
    std::thread::sleep(Duration::from_millis(300)); // let the write reach the guest (not a condition: any order holds)
    let started = Instant::now();
    let deleted = d.rpc("vm.delete", json!({"vms": ["mute"]}));
    assert_eq!(deleted["ok"], true, "{deleted}");
    assert!(started.elapsed() < Duration::from_secs(15), "delete took {:?}", started.elapsed());
    let answer = hung.join().unwrap();
    assert!(answer.contains("\"error\""), "{answer}");
    d.assert_no_leaked_processes();
}

#[test]
fn attack_version_mismatch_and_garbage_floods_log_a_bounded_amount() {
    let d = TestDaemon::start();
    vm_with_fake_agent(&d, "noisy", json!({}));
    let before = logged_bytes(&d);
    // 20000 wrong-version frames (1.5 MB) and 4 MB of garbage, each before a normal exec answer.
    d.set_fake_agent("noisy", json!({"exec": "version_flood:20000"}));
    let r = d.rpc("vm.exec", json!({"vm": "noisy", "command": ["true"], "timeout_secs": 30}));
    assert_eq!(r["exit_code"], 0, "{r}");
    d.set_fake_agent("noisy", json!({"exec": "garbage:4194304"}));
    let r = d.rpc("vm.exec", json!({"vm": "noisy", "command": ["true"], "timeout_secs": 30}));
    assert_eq!(r["exit_code"], 0, "{r}");
    let grown = logged_bytes(&d) - before;
    assert!(grown < 64 << 10, "5.5 MB of guest noise made the daemon log {grown} bytes");
}

#[test]
fn attack_an_error_with_a_bogus_kind_and_a_hostile_message_reaches_the_caller_capped_and_escaped() {
    let d = TestDaemon::start();
    // Every file read and exec is answered with an error whose kind is an object, not a name, and whose
    // message is 500 KB of terminal escapes, bidi overrides and newlines (as JSON, just under the 1 MiB a frame
    // can carry).
    vm_with_fake_agent(&d, "liar", json!({"read_file": "bad_error:500000", "exec": "bad_error:500000"}));
    for (method, params) in [
        ("vm.file_read", json!({"vm": "liar", "path": "/etc/hostname"})),
        ("vm.exec", json!({"vm": "liar", "command": ["true"], "timeout_secs": 30})),
    ] {
        let r = d.rpc_raw(method, params);
        let e = error_of(&r);
        let message = e["message"].as_str().unwrap();
        // The kind decoded as the catch-all: not the `not_found` the object's key names.
        let code = e["data"]["code"].as_str().unwrap();
        let expected = if method == "vm.file_read" { "invalid_argument" } else { "guest_unreachable" };
        assert_eq!(code, expected, "{method}: {e}");
        assert!(message.len() < 8 << 10, "{method}: a {} byte message reached the caller", message.len());
        assert!(message.contains("bytes in all"), "{method}: the cut is not marked: {message}");
        assert!(!message.chars().any(|c| c.is_control() || c == '\u{202e}'), "{method}: {message:?}");
        assert!(message.contains("\\x1b[2J"), "{method}: the escapes are not shown escaped: {message}");
        assert!(e["data"]["hint"].as_str().is_some_and(|h| !h.is_empty()), "{method}: no hint: {e}");
    }
    // The CLI prints it as one safe line too.
    let out = d.cli(&["vm", "exec", "liar", "--", "true"]);
    assert!(!out.status.success());
    let out = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("bytes in all"), "{out}");
    assert!(!out.chars().any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'), "{out:?}");
    // The channel is fine afterwards.
    d.set_fake_agent("liar", json!({}));
    let r = d.rpc("vm.exec", json!({"vm": "liar", "command": ["true"], "timeout_secs": 30}));
    assert_eq!(r["exit_code"], 0, "{r}");
}

#[test]
fn attack_trickled_answer_meets_the_call_deadline() {
    let d = TestDaemon::start();
    // The agent answers `ports` one byte every 200 ms: a ~100-byte answer would take 20 s.
    vm_with_fake_agent(&d, "slow", json!({"ports": "trickle:200"}));
    let started = Instant::now();
    let r = d.rpc_raw("vm.ports", json!({"vm": "slow"}));
    let e = error_of(&r);
    assert!(e["message"].as_str().unwrap().contains("did not answer within"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[test]
fn attack_huge_exec_output_is_capped_per_vm_and_the_cut_reported() {
    let d = TestDaemon::start_with_config("exec_spool_mib = 160");
    // Each exec is answered with 96 MiB of stdout: more than one VM's spool may hold across a few commands.
    vm_with_fake_agent(&d, "spool", json!({"exec": "flood:100663296"}));
    let mut kept = 0;
    for _ in 0..3 {
        let r = d.rpc("vm.exec", json!({"vm": "spool", "command": ["true"], "timeout_secs": 120}));
        assert_eq!(r["stdout_truncated"], true, "{r}");
        let id = r["output_id"].as_str().unwrap();
        let chunk = d.rpc("vm.exec_output", json!({"vm": "spool", "output_id": id, "stream": "stdout", "limit": 1}));
        let total = chunk["total_bytes"].as_u64().unwrap();
        assert!(total <= r["stdout_bytes"].as_u64().unwrap());
        kept += total;
    }
    let dir = d.state_dir.join("vms");
    let du = std::process::Command::new("du").args(["-sb"]).arg(&dir).output().unwrap();
    let used: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert!(kept < (3 * 96) << 20, "nothing was cut: {kept}");
    assert!(used < (160 << 20) + (64 << 20), "the VM folder holds {used} bytes");
}

#[test]
fn burst_of_execs_right_after_a_daemon_restart_all_succeed() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    for name in ["w1", "w2"] {
        assert_eq!(d.cli_json(&["vm", "create", "--name", name, "--memory", "256"])["state"], "running");
    }
    d.crash_and_restart();
    for (n, (r, _)) in execs_at_once(&d, "w1", 100).into_iter().enumerate() {
        assert_eq!(r["result"]["stdout"], format!("{n}\n"), "exec {n} after the restart: {r}");
    }
}

/// `n` execs of `echo <i>` on `vm` at once, each on its own connection; their answers in order, with the
/// moment each came back.
fn execs_at_once(d: &TestDaemon, vm: &str, n: usize) -> Vec<(Value, Instant)> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (socket, vm) = (d.socket.clone(), vm.to_string());
            std::thread::spawn(move || {
                let body = json!({"jsonrpc": "2.0", "id": i, "method": "vm.exec",
                                  "params": {"vm": vm, "command": ["sh", "-c", format!("echo {i}")], "timeout_secs": 120}})
                .to_string();
                let (_, text) = http_post(&socket, &body).expect("POST");
                (serde_json::from_str::<Value>(&text).unwrap(), Instant::now())
            })
        })
        .collect();
    calls.into_iter().map(|c| c.join().unwrap()).collect()
}

#[test]
fn attack_a_guest_that_never_says_hello_fails_every_waiting_call_at_once() {
    let mut d = TestDaemon::start();
    vm_with_fake_agent(&d, "mute", json!({"hello": "silent"}));
    // The restarted daemon has no connection: every call waits for one connect, which the guest never lets
    // finish. They must all get its failure when it ends, not queue up for a 20 s attempt each in turn.
    d.restart();
    let ended = execs_at_once(&d, "mute", 4);
    for (r, _) in &ended {
        let e = error_of(r);
        assert!(["timeout", "guest_unreachable"].contains(&e["data"]["code"].as_str().unwrap_or("")), "{e}");
    }
    let first = ended.iter().map(|(_, t)| *t).min().unwrap();
    let last = ended.iter().map(|(_, t)| *t).max().unwrap();
    // One shared attempt: they end together (serialised attempts would end 20 s apart).
    assert!(last - first < Duration::from_secs(10), "the calls ended {:?} apart", last - first);
    // The failure is not kept: once the guest answers again (told over SSH, the channel being what it
    // refuses), the next call makes a new attempt and succeeds.
    let out = d.vm_ssh("mute", &["sh", "-c", "echo '{}' > /run/banger-fake-agent.json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = d.rpc("vm.exec", json!({"vm": "mute", "command": ["sh", "-c", "echo $BANGER_FAKE_AGENT"]}));
    assert_eq!(r["stdout"], "1\n", "{r}");
}

#[test]
fn attack_pooled_clones_do_not_share_the_templates_link_local_address() {
    let d = TestDaemon::start_with_config("default_memory_mib = 256\n[warm]\npool_size = 2\nauto_build = false");
    d.register_test_image();
    wait_until("the pool to fill", Duration::from_secs(240), || {
        d.rpc("daemon.status", json!({}))["warm_pool"]["ready"] == 2
    });
    let mut addrs = vec![];
    for name in ["ll1", "ll2"] {
        d.rpc("vm.create", json!({"name": name}));
        // /proc/net/if_inet6: address, ifindex, prefix, scope (0x20 = link), flags (0x08 = dadfailed), name.
        let mut line = String::new();
        wait_until("the link-local address to settle", Duration::from_secs(30), || {
            let v6 = d.guest_ok(name, "cat /proc/net/if_inet6");
            line = v6.lines().find(|l| l.starts_with("fe80") && !l.ends_with(" lo")).unwrap_or_default().to_string();
            let flags = line.split_whitespace().nth(4).and_then(|f| u8::from_str_radix(f, 16).ok()).unwrap_or(0xff);
            !line.is_empty() && flags & 0x48 == 0 // neither dadfailed (0x08) nor tentative (0x40)
        });
        let v6 = d.guest_ok(name, "cat /proc/net/if_inet6");
        let link_locals: Vec<&str> = v6.lines().filter(|l| l.starts_with("fe80") && !l.ends_with(" lo")).collect();
        assert_eq!(link_locals.len(), 1, "one link-local address, not the template's too: {v6}");
        assert!(!line.starts_with("fe80000000000000505400fffeb00001"), "the template's address: {line}");
        addrs.push(line.split_whitespace().next().unwrap().to_string());
    }
    assert_ne!(addrs[0], addrs[1]);
}

#[test]
fn attack_console_flood_is_rotated_and_vm_logs_reads_only_the_tail() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.cli_json(&["vm", "create", "--name", "loud", "--memory", "256"]);
    // 10 MiB to the serial console: more than twice the console's cap.
    let r = d.rpc(
        "vm.exec",
        json!({"vm": "loud", "command": ["sh", "-c", "yes 'console flood line' | head -c 10485760 > /dev/console; echo last-line > /dev/console"],
               "timeout_secs": 300}),
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let console =
        std::path::PathBuf::from(d.rpc("vm.logs", json!({"vm": "loud", "tail": 1}))["path"].as_str().unwrap());
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let rotated = console.with_extension("log.1");
    wait_until("the console log to be rotated", Duration::from_secs(30), || {
        size(&rotated) > 0 && size(&console) <= 4 << 20
    });
    assert!(size(&rotated) <= 4 << 20, "{} bytes in {}", size(&rotated), rotated.display());
    let logs = d.rpc("vm.logs", json!({"vm": "loud", "tail": 3}));
    let lines = logs["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 3, "{logs}");
    assert!(lines.iter().any(|l| l.as_str().unwrap().contains("last-line")), "{logs}");
}

#[test]
fn attack_dns_floods_from_a_guest_cost_bounded_logs_and_descriptors() {
    let d = TestDaemon::start();
    vm_with_fake_agent(&d, "dnsflood", json!({}));
    let gateway = d.guest_ok("dnsflood", "sed -n 's/^nameserver //p' /etc/resolv.conf").trim().to_string();
    let before = logged_bytes(&d);
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(0, |r| r.count());
    let fds_before = fds();
    // 20000 UDP queries, then 300 TCP connections held open (the tool prints how many stayed open).
    let r = d.rpc(
        "vm.exec",
        json!({"vm": "dnsflood", "command": ["sh", "-c",
               format!("/root/banger-fake-agent dns-flood {gateway} 20000 300 >/tmp/held 2>/dev/null </dev/null & sleep 1; \
                        while [ ! -s /tmp/held ]; do sleep 0.2; done; cat /tmp/held")],
               "timeout_secs": 120}),
    );
    let held: usize = r["stdout"].as_str().unwrap().trim().parse().unwrap_or_else(|_| panic!("{r}"));
    assert!(held <= 4, "the DNS server kept {held} connections from one guest open");
    let grown = fds().saturating_sub(fds_before);
    assert!(grown <= 16, "the daemon holds {grown} more descriptors while the guest holds its connections");
    let logged = logged_bytes(&d) - before;
    assert!(logged < 256 << 10, "20000 queries made the daemon log {logged} bytes");
    // Queries still get answers.
    let out = d.netns.exec(&["getent", "hosts", "dnsflood.vm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn attack_a_guest_reported_file_size_is_never_trusted_by_export() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.cli_json(&["vm", "create", "--name", "sizes", "--memory", "384"]);
    let repo = host_repo("echo one > a && git add a && git -c user.name=a -c user.email=a@b commit -q -m one");
    d.rpc("workspace.prepare", json!({"vm": "sizes", "path": repo.path()}));
    // The guest is root: it puts a git in front of the real one that turns the changed-file list the export
    // script writes into a 512 MiB (sparse) file, so the agent reports, and serves, 512 MiB.
    d.guest_ok(
        "sizes",
        "printf '#!/bin/sh\\n/usr/bin/git \"$@\"; rc=$?\\ntruncate -s 512M /root/.banger-workspace/export.patch.files \
         2>/dev/null\\nexit $rc\\n' > /usr/local/bin/git && chmod 755 /usr/local/bin/git && echo two >> /root/repo/a",
    );
    let before = d.daemon_peak_rss();
    let r = d.rpc_raw("workspace.export", json!({"vm": "sizes"}));
    let e = error_of(&r);
    assert!(e["message"].as_str().unwrap().contains("larger than the"), "{e}");
    let grown = d.daemon_peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "the daemon's peak memory grew by {grown} bytes reading a 512 MiB file list");
    // Once the guest stops lying, export works again.
    d.guest_ok("sizes", "rm /usr/local/bin/git");
    let ok = d.rpc("workspace.export", json!({"vm": "sizes"}));
    assert!(ok["patch"].as_str().unwrap_or_default().contains("+two"), "{ok}");
}
