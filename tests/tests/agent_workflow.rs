//! The workflow banger exists for, end to end with a real guest: a host repository goes into a sandbox, a
//! long-lived session works on it (and survives a daemon restart), and the work comes back as a patch that
//! makes the host tree match the guest's exactly. Driven once by a plain JSON-RPC client on the socket and
//! once by the official Python MCP SDK over `banger mcp`.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_e2e::*;

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").args(["-ec", script]).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "host script failed: {script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 and path of every file of a work tree except .git.
const TREE_SUMS: &str = "find . -path ./.git -prune -o -type f -print0 | sort -z | xargs -0 sha256sum";

fn host_repo() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("banger-flow-").tempdir().unwrap();
    sh(
        dir.path(),
        "git init -q -b main . && git config user.name 'Host Dev' && git config user.email dev@example.invalid
         printf 'hello\\n' > README.md && mkdir src && printf 'fn main() {}\\n' > src/main.rs
         head -c 2048 /dev/urandom > logo.bin && git add -A && git commit -qm initial",
    );
    dir
}

/// Reads a session's whole log from offset 0 (the replay), following `more`.
fn replay(d: &TestDaemon, session: &str) -> (String, Value) {
    let (mut text, mut from) = (String::new(), 0u64);
    loop {
        let logs = d.rpc("session.logs", json!({"session": session, "from": from}));
        for c in logs["chunks"].as_array().unwrap() {
            text.push_str(c["data"].as_str().unwrap());
        }
        from = logs["next_offset"].as_u64().unwrap();
        if logs["more"] != true {
            return (text, logs);
        }
    }
}

#[test]
fn a_repository_goes_in_a_session_works_through_a_daemon_restart_and_the_patch_reproduces_the_guest_tree() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    let repo = host_repo();
    d.rpc("vm.create", json!({"name": "flow", "memory_mib": 384}));
    let prep = d.rpc("workspace.prepare", json!({"vm": "flow", "path": repo.path().display().to_string()}));
    let base = prep["base_commit"].as_str().unwrap().to_string();
    assert_eq!(base, sh(repo.path(), "git rev-parse HEAD").trim());

    // The session: commits once, then waits for instructions on stdin.
    let script = "cd /root/repo
        printf 'edited in the guest\\n' >> README.md
        git add -A && git commit -qm 'guest commit' && echo committed
        while read cmd; do
          case \"$cmd\" in
            more) printf '\\000\\001\\377binary' > data.bin; echo 'a new file' > new.txt
                  printf 'uncommitted\\n' >> src/main.rs; rm logo.bin; echo did-more ;;
            quit) echo bye; exit 0 ;;
          esac
        done";
    let s = d.rpc("session.start", json!({"vm": "flow", "name": "agent", "command": ["sh", "-c", script]}));
    let id = s["id"].as_str().unwrap().to_string();
    wait_until("the guest commit", Duration::from_secs(30), || replay(&d, &id).0.contains("committed"));

    // The daemon goes down hard mid-session; the session does not notice.
    d.crash_and_restart();
    assert_eq!(d.rpc("session.show", json!({"session": id}))["state"], "running");
    d.rpc("session.send", json!({"session": id, "data": "more\n"}));
    wait_until("the second round of edits", Duration::from_secs(30), || replay(&d, &id).0.contains("did-more"));
    d.rpc("session.send", json!({"session": id, "data": "quit\n"}));
    wait_until("the session to end", Duration::from_secs(30), || {
        d.rpc("session.show", json!({"session": id}))["state"] != "running"
    });
    // Replay from the start has everything, in order, across the restart.
    let (text, last) = replay(&d, &id);
    assert_eq!(text, "committed\ndid-more\nbye\n");
    assert_eq!(last["state"], "exited");
    assert_eq!(d.rpc("session.show", json!({"session": id}))["exit_code"], 0);

    // Export against the base: the guest commit and the uncommitted work, binary and new files, a deletion.
    let export =
        d.rpc("workspace.export", json!({"vm": "flow", "base": base, "check_repo": repo.path().display().to_string()}));
    assert_eq!(export["base_commit"], base.as_str());
    assert_eq!(export["check"]["clean"], true, "{}", export["check"]);
    assert_eq!(export["patch_inline"], true);
    assert_eq!(export["patch_encoding"], "text", "git's binary patches are text");
    let patch_file = repo.path().join("../flow.patch");
    std::fs::write(&patch_file, export["patch"].as_str().unwrap()).unwrap();
    sh(repo.path(), &format!("git apply {}", patch_file.display()));
    let host = sh(repo.path(), TREE_SUMS);
    let guest = d.guest_ok("flow", &format!("cd /root/repo && {TREE_SUMS}"));
    assert_eq!(host, guest, "the host tree matches the guest's exactly");
    assert!(host.contains("./data.bin") && host.contains("./new.txt") && !host.contains("./logo.bin"), "{host}");
    let _ = std::fs::remove_file(&patch_file);
    d.rpc("vm.delete", json!({"vms": ["flow"]}));
}

/// A repository whose test fails: `add.sh` subtracts.
fn buggy_repo() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("banger-canonical-").tempdir().unwrap();
    sh(
        dir.path(),
        "git init -q -b main . && git config user.name 'Host Dev' && git config user.email dev@example.invalid
         printf '#!/bin/sh\\necho $(($1 - $2))\\n' > add.sh
         printf '#!/bin/sh\\ngot=$(./add.sh 2 3)\\n[ \"$got\" = 5 ] && echo PASS || { echo \"FAIL: add 2 3 gave $got\"; exit 1; }\\n' > test.sh
         chmod +x add.sh test.sh && git add -A && git commit -qm 'add, with a bug'",
    );
    assert!(!Command::new("./test.sh").current_dir(dir.path()).status().unwrap().success(), "the bug is there");
    dir
}

/// Issue 18's canonical task, as an agent does it with the default toolset through the official Python MCP
/// SDK: five calls (vm_run, vm_exec, vm_exec, session_start, workspace_export), every result small unless it
/// carries what the agent asked for, progress usable by the client, and the patch fixes the host repository.
#[test]
fn the_python_mcp_sdk_does_the_canonical_task_in_five_calls() {
    let python = std::env::var("BANGER_TEST_PYTHON_MCP")
        .expect("BANGER_TEST_PYTHON_MCP is not set: scripts/test.sh installs the Python MCP SDK and sets it");
    let d = TestDaemon::start();
    d.register_test_image();
    let repo = buggy_repo();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/mcp_agent_workflow.py");
    let out = Command::new(python)
        .arg(script)
        .arg(bin("banger"))
        .arg(&d.socket)
        .arg(repo.path())
        .output()
        .expect("running the Python MCP client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();

    assert_eq!(r["server"], "banger");
    let calls = r["calls"].as_array().unwrap();
    let tools: Vec<&str> = calls.iter().map(|c| c["tool"].as_str().unwrap()).collect();
    assert_eq!(tools, ["vm_run", "vm_exec", "vm_exec", "session_start", "workspace_export"]);
    for tool in &tools {
        assert!(r["tools"].as_array().unwrap().iter().any(|t| t == tool), "{tool} is in the default toolset");
    }
    // Small results: the VM and its repository in under 2 KB; the rest carries output or a patch the agent
    // asked for, and nothing besides it beyond 2 KB.
    let bytes = |i: usize| calls[i]["bytes"].as_u64().unwrap() as usize;
    println!("result sizes: {calls:?}");
    assert!(bytes(0) < 2048, "vm_run's result is {} bytes", bytes(0));
    let asked = |s: &str| r[s]["stdout"].as_str().map_or(0, str::len);
    assert!(bytes(1) - asked("failing") < 2048 && bytes(2) - asked("fixed") < 2048, "{calls:?}");
    assert!(bytes(3) - r["session_output"].as_str().unwrap().len() < 2048, "{calls:?}");
    assert!(bytes(4) - r["patch"].as_str().map_or(0, str::len) < 2048, "{calls:?}");

    assert_eq!(r["vm_state"], "running");
    assert_eq!(r["failing"]["exit_code"], 1, "{}", r["failing"]);
    assert_eq!(r["failing"]["stdout"], "FAIL: add 2 3 gave -1\n");
    assert_eq!((r["fixed"]["exit_code"].clone(), r["fixed"]["stdout"].clone()), (json!(0), json!("PASS\n")));
    assert_eq!((r["session_state"].clone(), r["session_output"].clone()), (json!("running"), json!("got ping\n")));
    // vm_run reported its stages, every notification before the response, the last at its total, each new.
    let progress = r["progress"].as_array().unwrap();
    assert!(progress.len() >= 3, "vm_run reported its stages: {progress:?}");
    let last = progress.last().unwrap();
    assert_eq!(last["progress"], last["total"], "the last notification is at its total: {progress:?}");
    let values: Vec<f64> = progress.iter().map(|p| p["progress"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "progress only grows: {values:?}");
    let messages: Vec<&str> = progress.iter().map(|p| p["message"].as_str().unwrap_or_default()).collect();
    assert!(messages.windows(2).all(|w| w[0] != w[1]), "no message repeats: {messages:?}");

    // The patch was checked against the host repository, the VM deleted once it was, and applying it there
    // fixes the host's test.
    assert_eq!(r["base_commit_used"], r["base_commit"]);
    assert_eq!(r["check"]["clean"], true, "{}", r["check"]);
    assert_eq!(r["deleted"], true);
    let files: Vec<&str> = r["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(files, ["add.sh"]);
    let patch = r["patch"].as_str().expect("a small patch comes inline");
    std::fs::write(repo.path().join("../canonical.patch"), patch).unwrap();
    sh(repo.path(), "git apply ../canonical.patch && rm ../canonical.patch");
    assert_eq!(sh(repo.path(), "./test.sh"), "PASS\n");
    assert!(d.rpc("vm.list", json!({}))["vms"].as_array().unwrap().is_empty(), "the sandbox is gone");
    let missing = &r["missing_error"];
    assert_eq!(missing["code"], "not_found", "{missing}");
    assert_eq!(missing["next"][0]["tool"], "vm_list", "{missing}");
    d.assert_no_leaked_processes();
}
