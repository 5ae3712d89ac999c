//! Pipe-mode sessions in real guests: start, send, logs with cursors, daemon restarts, stop/kill,
//! attach (exclusive, and the CLI's stdio bridge) and the JSON-RPC subscription.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use banger_e2e::*;

/// A line-protocol peer: prefixes each line with `GOT:` and upper-cases it, line by line (sed -u does not
/// buffer). Its first words go to stderr so the log holds both streams.
const UPPER: &str = "echo \"$GREETING from $(pwd)\" >&2; exec stdbuf -oL sed -e 's/^/got:/' -e 'y/abcdefghijklmnopqrstuvwxyz/ABCDEFGHIJKLMNOPQRSTUVWXYZ/'";

fn start_upper(d: &TestDaemon, vm: &str, name: &str) -> Value {
    d.rpc(
        "session.start",
        json!({"vm": vm, "name": name, "command": ["sh", "-c", UPPER], "cwd": "/tmp", "env": {"GREETING": "hi"}}),
    )
}

/// The whole log from `from` as (stream, bytes) runs, read through `session.logs` cursors.
fn read_log(d: &TestDaemon, session: &str, from: u64) -> (Vec<(String, String)>, u64) {
    let mut runs: Vec<(String, String)> = vec![];
    let mut cursor = from;
    loop {
        let r = d.rpc("session.logs", json!({"session": session, "from": cursor}));
        assert_eq!(r["from"], cursor);
        for c in r["chunks"].as_array().unwrap() {
            assert_eq!(c["encoding"], "text", "{c}");
            assert_eq!(c["offset"], cursor, "chunks are contiguous");
            let data = c["data"].as_str().unwrap();
            cursor += data.len() as u64;
            match runs.last_mut() {
                Some((s, text)) if s == c["stream"].as_str().unwrap() => text.push_str(data),
                _ => runs.push((c["stream"].as_str().unwrap().to_string(), data.to_string())),
            }
        }
        assert_eq!(r["next_offset"], cursor);
        if r["more"] == false {
            return (runs, cursor);
        }
    }
}

fn stdout_of(runs: &[(String, String)]) -> String {
    runs.iter().filter(|(s, _)| s == "stdout").map(|(_, t)| t.as_str()).collect()
}

/// Waits (with `wait_ms`, not a fast poll) until the session's stdout holds `needle`.
fn wait_for_output(d: &TestDaemon, session: &str, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (runs, end) = read_log(d, session, 0);
        if stdout_of(&runs).contains(needle) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no `{needle}` in the output: {runs:?}");
        d.rpc("session.logs", json!({"session": session, "from": end, "wait_ms": 5000, "limit": 1}));
    }
}

#[test]
fn sessions_survive_daemon_restarts_and_keep_messages_whole() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "sess", "memory_mib": 384}));

    // Preflight: specific errors, and nothing is left behind.
    let e = d.rpc_raw("session.start", json!({"vm": "sess", "command": ["cat"], "cwd": "/no/such/dir"}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("working directory /no/such/dir does not exist"), "{e}");
    let e = d.rpc_raw("session.start", json!({"vm": "sess", "command": ["no-such-tool", "-x"]}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("`no-such-tool` was not found on the guest's PATH"),
        "{e}"
    );
    let e = d.rpc_raw("session.start", json!({"vm": "sess", "command": ["cat"], "cwd": "relative"}));
    assert!(e["error"]["message"].as_str().unwrap().contains("absolute"), "{e}");
    assert_eq!(d.rpc("session.list", json!({}))["sessions"], json!([]));

    let s = start_upper(&d, "sess", "upper");
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(s["state"], "running", "{s}");
    assert!(s["pid"].as_u64().is_some() && s["program"].as_str().unwrap().ends_with("/sh"), "{s}");
    let e = d.rpc_raw("session.start", json!({"vm": "sess", "name": "upper", "command": ["cat"]}));
    assert_eq!(e["error"]["data"]["code"], "already_exists", "{e}");

    d.rpc("session.send", json!({"session": "upper", "data": "hello\n"}));
    wait_for_output(&d, &id, "GOT:HELLO\n");
    let (runs, _) = read_log(&d, &id, 0);
    assert_eq!(runs[0], ("stderr".to_string(), "hi from /tmp\n".to_string()), "stderr is labelled: {runs:?}");

    // Concurrent 100 KiB sends: each arrives as one whole line, never interleaved with another.
    let letters = ['a', 'b', 'c', 'd', 'e', 'f'];
    std::thread::scope(|scope| {
        for (i, c) in letters.iter().enumerate() {
            let d = &d;
            scope.spawn(move || {
                let line = format!("m{i}-{}\n", c.to_string().repeat(100 * 1024));
                let r = d.rpc("session.send", json!({"session": "upper", "vm": "sess", "data": line}));
                assert_eq!(r["bytes"], line.len());
            });
        }
    });
    wait_for_output(&d, &id, &format!("M5-{}", "F".repeat(100 * 1024)));
    for i in 0..letters.len() {
        wait_for_output(&d, &id, &format!("GOT:M{i}-"));
    }
    let (runs, end) = read_log(&d, &id, 0);
    let out = stdout_of(&runs);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + letters.len(), "one line per message");
    for line in &lines[1..] {
        let (tag, body) = line.split_once('-').unwrap();
        let i: usize = tag.trim_start_matches("GOT:M").parse().unwrap();
        let want = letters[i].to_ascii_uppercase().to_string().repeat(100 * 1024);
        assert!(body == want, "message {i} was interleaved or cut ({} bytes)", body.len());
    }

    // Cursors: from a middle offset the log is exactly the tail of the full replay.
    let full: String = runs.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(full.len() as u64, end);
    let middle = end / 2;
    let (tail, tail_end) = read_log(&d, &id, middle);
    assert_eq!(tail_end, end);
    assert_eq!(tail.iter().map(|(_, t)| t.as_str()).collect::<String>(), full[middle as usize..]);
    let e = d.rpc_raw("session.logs", json!({"session": &id, "from": end + 10}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");

    // The CLI sends a line (newline added) and reads the log back with the streams apart.
    let out = d.cli(&["vm", "session", "send", "upper", "from the cli"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_output(&d, &id, "GOT:FROM THE CLI\n");
    let out = d.cli(&["vm", "session", "logs", "upper", "--from", &end.to_string()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "GOT:FROM THE CLI\n");
    let (runs, end) = read_log(&d, &id, 0);

    // A second session that ends on SIGTERM with its own code (via the CLI).
    let out = d.cli(&[
        "vm",
        "session",
        "start",
        "sess",
        "--name",
        "sleeper",
        "--json",
        "--",
        "sh",
        "-c",
        "trap 'exit 7' TERM; while true; do sleep 1; done",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sleeper: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sleeper["state"], "running");

    // The daemon dies; the sessions do not, and their output is intact.
    d.crash_and_restart();
    let shown = d.rpc("session.show", json!({"session": "upper"}));
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["output_bytes"], end);
    assert_eq!(read_log(&d, &id, 0).0, runs);
    d.rpc("session.send", json!({"session": &id, "data": "after restart\n"}));
    wait_for_output(&d, &id, "GOT:AFTER RESTART\n");

    let listed = d.cli_json(&["vm", "session", "list", "sess"]);
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 2, "{listed}");

    let stopped = d.cli_json(&["vm", "session", "stop", "sleeper", "--grace", "10"]);
    assert_eq!(stopped["state"], "exited", "{stopped}");
    assert_eq!(stopped["exit_code"], 7, "{stopped}");
    assert!(stopped["ended_at_ms"].as_u64().is_some());
    let killed = d.rpc("session.kill", json!({"session": "upper"}));
    assert_eq!(killed["state"], "killed", "{killed}");
    assert_eq!(killed["signal"], 9, "{killed}");
    let e = d.rpc_raw("session.send", json!({"session": "upper", "data": "late\n"}));
    assert_eq!(e["error"]["data"]["code"], "failed_precondition", "{e}");
    // The log of an ended session stays readable.
    assert!(stdout_of(&read_log(&d, &id, 0).0).ends_with("GOT:AFTER RESTART\n"));

    // A VM stop under a running session leaves it lost, with the reason.
    d.rpc("session.start", json!({"vm": "sess", "name": "orphan", "command": ["sleep", "1000"]}));
    d.rpc("vm.stop", json!({"vms": ["sess"]}));
    let orphan = d.rpc("session.show", json!({"session": "orphan"}));
    assert_eq!(orphan["state"], "lost", "{orphan}");
    assert!(orphan["lost_reason"].as_str().unwrap().contains("stopped"), "{orphan}");
    assert_eq!(d.rpc("session.show", json!({"session": "sleeper"}))["exit_code"], 7);

    d.rpc("vm.delete", json!({"vms": ["sess"]}));
    assert_eq!(d.rpc("session.list", json!({}))["sessions"], json!([]), "deleting a VM deletes its sessions");
    d.assert_no_leaked_processes();
}

/// A jsonrpsee WebSocket client over the daemon socket, as any script would write it.
async fn ws_client(socket: &std::path::Path) -> jsonrpsee::core::client::Client {
    use jsonrpsee::client_transport::ws::{Url, WsTransportClientBuilder};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (tx, rx) = WsTransportClientBuilder::default()
        .build_with_stream(Url::parse("ws://localhost/").unwrap(), stream)
        .await
        .unwrap();
    jsonrpsee::core::client::ClientBuilder::default().build_with_tokio(tx, rx)
}

fn obj(v: Value) -> jsonrpsee::core::params::ObjectParams {
    let mut p = jsonrpsee::core::params::ObjectParams::new();
    for (k, v) in v.as_object().unwrap() {
        p.insert(k, v).unwrap();
    }
    p
}

fn attach_child(d: &TestDaemon, session: &str, extra: &[&str]) -> std::process::Child {
    Command::new(bin("banger"))
        .args(["vm", "session", "attach", session])
        .args(extra)
        .env("BANGER_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting banger vm session attach")
}

#[test]
fn attach_is_exclusive_bridges_a_line_protocol_and_subscriptions_push_output() {
    use jsonrpsee::core::client::SubscriptionClientT;

    let mut d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "bridge", "memory_mib": 384}));
    let id = start_upper(&d, "bridge", "rpc")["id"].as_str().unwrap().to_string();

    // The CLI bridge: JSONL in, transformed JSONL out, straight through.
    let mut child = attach_child(&d, "rpc", &[]);
    wait_until("the attach to be registered", Duration::from_secs(30), || {
        d.rpc("session.show", json!({"session": &id}))["attached"] == true
    });
    let second = d.cli(&["vm", "session", "attach", "rpc"]);
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already attached") && err.contains("[busy]"), "{err}");

    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for i in 0..3 {
        writeln!(stdin, "{{\"type\":\"prompt\",\"id\":{i}}}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, format!("GOT:{{\"TYPE\":\"PROMPT\",\"ID\":{i}}}\n"));
    }
    // The daemon crashes under the bridge: it re-attaches where it left off and the protocol goes on.
    d.crash_and_restart();
    writeln!(stdin, "{{\"type\":\"prompt\",\"id\":3}}").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "GOT:{\"TYPE\":\"PROMPT\",\"ID\":3}\n");

    // End of input detaches; the session runs on.
    drop(stdin);
    let st = child.wait().unwrap();
    assert!(st.success(), "attach exited {st}");
    let shown = d.rpc("session.show", json!({"session": &id}));
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["attached"], false, "{shown}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = ws_client(&d.socket).await;
        // Follow without polling: the notification carries output sent after subscribing.
        let mut sub = client
            .subscribe::<Value, _>("session.subscribe", obj(json!({"session": &id})), "session.unsubscribe")
            .await
            .unwrap();
        d.rpc("session.send", json!({"session": &id, "data": "pushed\n"}));
        let ev = tokio::time::timeout(Duration::from_secs(30), sub.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(ev["event"], "output", "{ev}");
        assert_eq!(ev["stream"], "stdout");
        assert_eq!(ev["data"], "GOT:PUSHED\n");

        // A raw attach holds the session; the CLI steals it and the holder is told.
        let mut held = client
            .subscribe::<Value, _>("session.attach", obj(json!({"session": &id})), "session.detach")
            .await
            .unwrap();
        let refused =
            client.subscribe::<Value, _>("session.attach", obj(json!({"session": &id})), "session.detach").await;
        assert!(format!("{:?}", refused.err().unwrap()).contains("already attached"));
        let mut thief = attach_child(&d, &id, &["--steal", "--replay"]);
        // Held open until the end: `wait` would close it, and end of input detaches.
        let thief_stdin = thief.stdin.take();
        let ev = tokio::time::timeout(Duration::from_secs(30), held.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(ev["event"], "detached", "{ev}");

        // --replay starts at offset 0; killing the session ends the bridge with 128+9.
        let mut out = BufReader::new(thief.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first, "GOT:{\"TYPE\":\"PROMPT\",\"ID\":0}\n");
        d.rpc("session.kill", json!({"session": &id}));
        let ev = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let ev = sub.next().await.unwrap().unwrap();
                if ev["event"] == "ended" {
                    return ev;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(ev["session"]["signal"], 9, "{ev}");
        let st = thief.wait().unwrap();
        drop(thief_stdin);
        assert_eq!(st.code(), Some(137), "attach exits like a shell after SIGKILL");
    });
    // MCP: session_logs with wait_ms returns output that arrives while it waits.
    let id2 = start_upper(&d, "bridge", "mcp")["id"].as_str().unwrap().to_string();
    let mut mcp = RawMcp::connect(&d.socket);
    mcp.initialize();
    // Its greeting on stderr ("hi from /tmp\n") is there first, so the read below has to wait.
    wait_until("the greeting", Duration::from_secs(30), || {
        d.rpc("session.show", json!({"session": &id2}))["output_bytes"] == 13
    });
    let size = 13;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            d.rpc("session.send", json!({"session": &id2, "data": "late arrival\n"}));
        });
        let started = std::time::Instant::now();
        let r = mcp.request(
            1,
            "tools/call",
            json!({"name": "session_logs", "arguments": {"session": &id2, "from": size, "wait_ms": 30000}}),
        );
        let logs = &r["result"]["structuredContent"];
        assert_eq!(logs["chunks"][0]["data"], "GOT:LATE ARRIVAL\n", "{r}");
        assert_eq!(logs["from"], size);
        assert!(started.elapsed() < Duration::from_secs(25), "answered when the output came, not at the deadline");
    });

    // The guest agent restarts (init supervises it): the session it ran is reported lost, not running.
    d.rpc("session.start", json!({"vm": "bridge", "name": "doomed", "command": ["sleep", "1000"]}));
    let kill_agent = "sleep 1; for d in /proc/[0-9]*; do case \"$(tr '\\0' ' ' < $d/cmdline)\" in \
                      *banger-agent\\ serve*) kill ${d#/proc/};; esac; done";
    let r = d.rpc("vm.exec", json!({"vm": "bridge", "command": ["setsid", "-f", "sh", "-c", kill_agent]}));
    assert_eq!(r["exit_code"], 0, "{r}");
    wait_until("the session to be reported lost", Duration::from_secs(60), || {
        let r = d.rpc_raw("session.show", json!({"session": "doomed"}));
        r["result"]["state"] == "lost"
    });
    let doomed = d.rpc("session.show", json!({"session": "doomed"}));
    assert!(doomed["lost_reason"].as_str().unwrap().contains("guest agent restarted"), "{doomed}");

    d.rpc("vm.delete", json!({"vms": ["bridge"]}));
    d.assert_no_leaked_processes();
}
