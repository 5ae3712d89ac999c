//! workspace prepare/export with real guests: a host repository into the VM and the VM's work back.
use std::path::Path;
use std::process::Command;

use banger_e2e::*;

/// Runs a shell script in the guest and returns its stdout; fails the test unless it exits 0.
fn guest_sh(d: &TestDaemon, vm: &str, script: &str) -> String {
    let r = d.rpc("vm.exec", json!({"vm": vm, "command": ["sh", "-ec", script]}));
    assert_eq!(r["exit_code"], 0, "guest script failed: {script}\n{r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// Runs a shell script on the host in `dir` (as root, on a repository owned by someone else).
fn host_sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*")
        .output()
        .unwrap();
    assert!(out.status.success(), "host script failed: {script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 and path of every file of a work tree, .git and the ignored build/ left out.
const TREE_SUMS: &str =
    "find . -path ./.git -prune -o -path ./build -prune -o -type f -print0 | sort -z | xargs -0 sha256sum";

/// A repository like a user's: two commits, a binary file, names with spaces, an uncommitted edit, owned
/// by another user (the daemon runs as root).
fn user_repo() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("banger-ws-").tempdir().unwrap();
    host_sh(
        dir.path(),
        "git init -q -b main .
         git config user.name 'Ada Host'; git config user.email ada@example.invalid
         printf 'one\\ntwo\\nthree\\n' > a.txt
         printf 'spaced\\n' > 'name with spaces.txt'
         head -c 3000 /dev/urandom > blob.bin; printf '\\000\\377' >> blob.bin
         printf 'gone soon\\n' > doomed.txt; printf 'moving\\n' > move-me.txt
         printf 'build/\\n' > .gitignore
         git add -A; git commit -q -m first
         printf 'four\\n' >> a.txt; git commit -q -am second
         printf 'uncommitted host edit\\n' >> 'name with spaces.txt'
         chown -R 65534:65534 .",
    );
    dir
}

fn create_vm(d: &TestDaemon, name: &str) {
    d.register_test_image();
    let vm = d.cli_json(&["vm", "create", "--name", name, "--memory", "512"]);
    assert_eq!(vm["state"], "running");
}

#[test]
fn prepare_then_export_brings_back_every_change_and_checks_it_applies() {
    let d = TestDaemon::start();
    create_vm(&d, "ws");
    let repo = user_repo();
    let repo_path = repo.path().to_str().unwrap();
    let host_head = host_sh(repo.path(), "git rev-parse HEAD").trim().to_string();

    let r = d.cli_json(&["vm", "workspace", "prepare", "ws", repo_path]);
    assert_eq!(r["path"], "/root/repo");
    assert_eq!(r["head_commit"], host_head.as_str());
    assert_eq!(r["host_head"], host_head.as_str());
    assert_eq!(r["host_dirty"], true, "{r}");
    assert_ne!(r["base_commit"], r["head_commit"], "the uncommitted edit makes a snapshot base");
    assert_eq!(r["branch"], "main");
    assert_eq!(r["files"], 1, "only the file that differs from HEAD is copied over the checkout: {r}");
    assert_eq!(r["git_user_name"], "Ada Host");
    let base = r["base_commit"].as_str().unwrap().to_string();

    // The guest has the same HEAD and history, the identity, the host's uncommitted edit and the bytes.
    assert_eq!(guest_sh(&d, "ws", "git -C /root/repo rev-parse HEAD").trim(), host_head);
    assert_eq!(guest_sh(&d, "ws", "git -C /root/repo log --format=%s").trim(), "second\nfirst");
    assert_eq!(guest_sh(&d, "ws", "git -C /root/repo config user.email").trim(), "ada@example.invalid");
    assert_eq!(guest_sh(&d, "ws", "git -C /root/repo rev-parse refs/banger/base").trim(), base);
    assert_eq!(guest_sh(&d, "ws", "cat '/root/repo/name with spaces.txt'"), "spaced\nuncommitted host edit\n");
    assert_eq!(guest_sh(&d, "ws", &format!("cd /root/repo && {TREE_SUMS}")), host_sh(repo.path(), TREE_SUMS));

    // The agent's work: a commit, then uncommitted edits, untracked and binary files, a delete, a rename,
    // and an ignored build output.
    guest_sh(
        &d,
        "ws",
        "cd /root/repo
         printf 'one\\nTWO from guest\\nthree\\nfour\\n' > a.txt; git commit -q -am 'guest commit'
         printf 'uncommitted guest line\\n' >> a.txt
         printf 'brand new\\n' > 'new file.txt'
         head -c 5000 /dev/urandom > new.bin
         printf 'x' >> blob.bin
         rm doomed.txt
         git mv move-me.txt moved.txt
         mkdir -p build; echo artefact > build/out",
    );
    let index_before = guest_sh(&d, "ws", "sha256sum /root/repo/.git/index");

    let patch_file = repo.path().parent().unwrap().join(format!("{}.patch", repo.path().display()));
    let patch_s = patch_file.to_str().unwrap();
    let r =
        d.cli_json(&["vm", "workspace", "export", "ws", "--base", &base, "--output", patch_s, "--check", repo_path]);
    assert_eq!(r["base_commit"], base.as_str());
    assert_ne!(r["guest_head"], host_head.as_str(), "the guest committed");
    assert_eq!(r["check"]["clean"], true, "{r}");
    let status =
        |path: &str| r["files"].as_array().unwrap().iter().find(|f| f["path"] == path).map(|f| f["status"].clone());
    assert_eq!(status("a.txt"), Some(json!("modified")));
    assert_eq!(status("new file.txt"), Some(json!("added")));
    assert_eq!(status("new.bin"), Some(json!("added")));
    assert_eq!(status("blob.bin"), Some(json!("modified")));
    assert_eq!(status("doomed.txt"), Some(json!("deleted")));
    assert_eq!(status("moved.txt"), Some(json!("renamed")));
    assert_eq!(status("name with spaces.txt"), None, "the host's own edit is in the base, not the patch");
    assert_eq!(r["ignored"], json!(["build/"]), "ignored files are named, not silently dropped");
    let patch = std::fs::read(&patch_file).unwrap();
    assert_eq!(r["patch_bytes"], patch.len() as u64);
    assert_eq!(guest_sh(&d, "ws", "sha256sum /root/repo/.git/index"), index_before, "the agent's index is untouched");

    // Without a base the recorded one is used; the patch on stdout is the same bytes.
    let out = d.cli(&["vm", "workspace", "export", "ws"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, patch, "stdout carries exactly the patch");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("6 files changed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The host changes a line the guest touched: the check reports the conflict and exits 2.
    host_sh(repo.path(), "sed -i 's/^two$/two on the host/' a.txt");
    let out = d.cli(&["vm", "workspace", "export", "ws", "--output", patch_s, "--check", repo_path]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("does NOT apply cleanly") && stdout.contains("a.txt"), "{stdout}");
    host_sh(repo.path(), "git checkout -q -- a.txt");

    // Applied on the host, the patch makes the host tree the guest tree, file for file and byte for byte.
    host_sh(repo.path(), &format!("git apply '{patch_s}'"));
    assert_eq!(host_sh(repo.path(), TREE_SUMS), guest_sh(&d, "ws", &format!("cd /root/repo && {TREE_SUMS}")));
    assert!(!repo.path().join("doomed.txt").exists() && repo.path().join("moved.txt").exists());
    let _ = std::fs::remove_file(&patch_file);

    d.rpc("vm.delete", json!({"vms": ["ws"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn full_mode_force_and_errors() {
    let d = TestDaemon::start();
    create_vm(&d, "wsx");
    let repo = user_repo();
    let repo_path = repo.path().to_str().unwrap();
    host_sh(repo.path(), "printf 'untracked notes\\n' > notes.txt; mkdir -p build; echo x > build/ignored");

    // Not a git repository: said plainly, nothing made in the guest.
    let plain = tempfile::tempdir().unwrap();
    let e = d.rpc_raw("workspace.prepare", json!({"vm": "wsx", "path": plain.path()}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("not inside a git work tree"), "{e}");
    let e = d.rpc_raw("workspace.prepare", json!({"vm": "wsx", "path": "relative/dir"}));
    assert!(e["error"]["message"].as_str().unwrap().contains("absolute"), "{e}");
    // Export before any prepare says what to do.
    let e = d.rpc_raw("workspace.export", json!({"vm": "wsx"}));
    assert_eq!(e["error"]["data"]["code"], "failed_precondition", "{e}");
    assert_eq!(next_steps(&e["error"]["data"])[0].0, "workspace.prepare", "{e}");
    assert_eq!(guest_sh(&d, "wsx", "ls -A /root/repo 2>/dev/null | wc -l").trim(), "0");

    // Full mode brings untracked files, never ignored ones; the base snapshot includes them.
    let r = d.cli_json(&["vm", "workspace", "prepare", "wsx", repo_path, "--full"]);
    assert_eq!(r["mode"], "full");
    assert_eq!(guest_sh(&d, "wsx", "cat /root/repo/notes.txt"), "untracked notes\n");
    assert_eq!(guest_sh(&d, "wsx", "test -e /root/repo/build && echo yes || echo no").trim(), "no");
    let r = d.rpc("workspace.export", json!({"vm": "wsx"}));
    assert_eq!(r["files"], json!([]), "nothing changed in the guest yet: {r}");
    assert_eq!(r["patch"], "");

    // The agent's work is never replaced without --force.
    guest_sh(&d, "wsx", "echo precious > /root/repo/agent-work.txt");
    let out = d.cli(&["vm", "workspace", "prepare", "wsx", repo_path]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already has a non-empty /root/repo") && err.contains("--force"), "{err}");
    assert_eq!(guest_sh(&d, "wsx", "cat /root/repo/agent-work.txt"), "precious\n");
    let r = d.cli_json(&["vm", "workspace", "prepare", "wsx", repo_path, "--force"]);
    assert_eq!(r["replaced"], true);
    assert_eq!(guest_sh(&d, "wsx", "test -e /root/repo/agent-work.txt && echo yes || echo no").trim(), "no");
    assert_eq!(guest_sh(&d, "wsx", "ls -A /root | grep -c banger-replaced || true").trim(), "0");

    // A patch bigger than the inline limit is never cut: it stays whole in the guest, named with its hash.
    guest_sh(&d, "wsx", "head -c 300000 /dev/urandom > /root/repo/big.bin");
    let r = d.rpc("workspace.export", json!({"vm": "wsx", "max_inline_bytes": 1000}));
    assert_eq!(r["patch_inline"], false, "{r}");
    assert!(r.get("patch").is_none());
    assert!(r["patch_bytes"].as_u64().unwrap() > 300_000);
    let path = r["patch_path"].as_str().unwrap();
    let sum = guest_sh(&d, "wsx", &format!("sha256sum < {path}"));
    assert_eq!(sum.split_whitespace().next(), r["patch_sha256"].as_str());
    assert_eq!(r["files"], json!([{"status": "added", "path": "big.bin"}]));

    // Over MCP, export reports its stages as progress notifications; both operations show up, finished
    // with their stages, in operation.list.
    let mut m = RawMcp::connect(&d.socket);
    m.initialize();
    m.send_line(
        &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "workspace_export", "arguments": {"vm": "wsx"}, "_meta": {"progressToken": "ws-1"}}})
        .to_string(),
    );
    let mut progress = vec![];
    let result = loop {
        let msg = m.recv();
        if msg["method"] == "notifications/progress" {
            progress.push((msg["params"]["progress"].as_f64().unwrap(), msg["params"]["message"].to_string()));
        } else if msg["id"] == 3 {
            break msg;
        }
    };
    assert_eq!(result["result"]["structuredContent"]["patch_inline"], true, "{result}");
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0), "progress must not go back: {progress:?}");
    for stage in ["diff", "fetch", "check"] {
        assert!(progress.iter().any(|(_, msg)| msg.contains(stage)), "no {stage} progress: {progress:?}");
    }
    let ops = d.rpc("operation.list", json!({}));
    let prepares: Vec<&Value> =
        ops["operations"].as_array().unwrap().iter().filter(|o| o["kind"] == "workspace.prepare").collect();
    assert_eq!(prepares.len(), 3, "{ops}");
    let last = prepares.last().unwrap();
    assert_eq!(last["state"], "succeeded", "{ops}");
    assert!(last["stages"].as_array().unwrap().iter().all(|s| s["state"] == "done"), "{ops}");

    // A base that is not a commit in the guest, or not a revision at all.
    let e = d.rpc_raw("workspace.export", json!({"vm": "wsx", "base": "no-such-ref"}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    let e = d.rpc_raw("workspace.export", json!({"vm": "wsx", "base": "--output=/etc/x"}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");

    // A stopped VM: both operations refuse and say how to start it.
    d.rpc("vm.stop", json!({"vms": ["wsx"]}));
    for (method, params) in
        [("workspace.prepare", json!({"vm": "wsx", "path": repo_path})), ("workspace.export", json!({"vm": "wsx"}))]
    {
        let e = d.rpc_raw(method, params);
        assert_eq!(e["error"]["data"]["code"], "failed_precondition", "{method}: {e}");
        assert_eq!(next_steps(&e["error"]["data"]), [("vm.start".to_string(), json!({"vm": "wsx"}))], "{e}");
    }
    d.rpc("vm.delete", json!({"vms": ["wsx"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn vm_run_creates_a_vm_for_the_repository_prepares_it_and_prints_next_steps() {
    let d = TestDaemon::start();
    d.register_test_image();
    // Not a repository: refused before any VM exists.
    let plain = tempfile::tempdir().unwrap();
    let out = d.cli(&["vm", "run", plain.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a git repository"), "{out:?}");
    assert!(d.rpc("vm.list", json!({}))["vms"].as_array().unwrap().is_empty(), "no VM was made");

    let repo = user_repo();
    let out = d.cli(&["vm", "run", repo.path().to_str().unwrap(), "--memory", "256"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Named after the repository's folder, and the next steps name it.
    let name = repo.path().file_name().unwrap().to_string_lossy().to_lowercase();
    assert!(stdout.contains(&format!("banger vm workspace export {name} | git apply")), "{stdout}");
    // The test image has no coding agent: no agent is suggested, and the way to get one is.
    assert!(!stdout.contains("-- claude") && !stdout.contains("session start"), "{stdout}");
    assert!(stdout.contains("has no coding agent") && stdout.contains("--recipe debian-agent"), "{stdout}");
    assert_eq!(d.rpc("vm.show", json!({"vm": name}))["state"], "running");
    let host_head = host_sh(repo.path(), "git rev-parse HEAD");
    assert_eq!(guest_sh(&d, &name, "git -C /root/repo rev-parse HEAD"), host_head);
    d.rpc("vm.delete", json!({"vms": [name]}));
}

/// Polls an operation until `stage` is running, failing if the operation ends first.
fn wait_for_stage(d: &TestDaemon, id: &Value, stage: &str) -> Value {
    let mut last = Value::Null;
    wait_until(&format!("stage {stage} to run"), std::time::Duration::from_secs(180), || {
        last = d.rpc("operation.status", json!({"id": id}));
        assert_eq!(last["state"], "running", "the operation ended before {stage}: {last}");
        last["stages"].as_array().unwrap().iter().any(|s| s["name"] == stage && s["state"] == "running")
    });
    last
}

#[test]
fn vm_run_works_over_json_rpc_and_mcp() {
    let d = TestDaemon::start();
    d.register_test_image();
    let repo = user_repo();
    let path = repo.path().to_str().unwrap();
    let host_head = host_sh(repo.path(), "git rev-parse HEAD");

    // JSON-RPC: the blocking call returns the running VM and the prepared repository.
    let r = d.rpc("vm.run", json!({"path": path, "create": {"name": "rpcrun", "memory_mib": 256}}));
    assert_eq!(r["vm"]["name"], "rpcrun", "{r}");
    assert_eq!(r["vm"]["state"], "running", "{r}");
    assert_eq!(r["workspace"]["head_commit"].as_str().unwrap(), host_head.trim(), "{r}");
    assert_eq!(guest_sh(&d, "rpcrun", "git -C /root/repo rev-parse HEAD"), host_head);
    // By the time the run returns the daemon has waited for sshd and pinned its host key.
    let known_hosts = std::fs::read_to_string(d.state_dir.join("ssh/known_hosts")).unwrap_or_default();
    assert!(known_hosts.lines().any(|l| l.starts_with("rpcrun.vm,")), "no pin for rpcrun: {known_hosts}");
    let ops = d.rpc("operation.list", json!({}));
    let run = ops["operations"].as_array().unwrap().iter().find(|o| o["kind"] == "vm.run").expect("a vm.run op");
    let stages: Vec<&str> = run["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["create", "sshd", "prepare"]);
    assert!(run["stages"].as_array().unwrap().iter().all(|s| s["state"] == "done"), "{run}");

    // MCP: the same operation as a tool, with progress.
    let mut m = RawMcp::connect(&d.socket);
    m.initialize();
    let r = m.request(
        5,
        "tools/call",
        json!({"name": "vm_run", "arguments": {"path": path, "create": {"name": "mcprun", "memory_mib": 256}},
               "_meta": {"progressToken": "run-1"}}),
    );
    let result = &r["result"]["structuredContent"];
    assert_eq!(result["vm"]["name"], "mcprun", "{r}");
    assert_eq!(result["workspace"]["path"], "/root/repo", "{r}");
    assert_eq!(guest_sh(&d, "mcprun", "git -C /root/repo rev-parse HEAD"), host_head);

    // A path that is not a repository is refused before anything is made.
    let plain = tempfile::tempdir().unwrap();
    let e = d.rpc_raw("vm.run", json!({"path": plain.path().to_str().unwrap(), "create": {"name": "nope"}}));
    assert!(e["error"]["data"]["message"].as_str().unwrap_or_default().contains("not inside a git work tree"), "{e}");
    d.rpc("vm.delete", json!({"vms": ["rpcrun", "mcprun"]}));
    assert!(d.rpc("vm.list", json!({}))["vms"].as_array().unwrap().is_empty());
    d.assert_no_leaked_processes();
}

/// A repository whose prepare takes a while: 48 MiB of incompressible history.
fn big_repo() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("banger-ws-big-").tempdir().unwrap();
    host_sh(
        dir.path(),
        "git init -q -b main .
         git config user.name 'Ada Host'; git config user.email ada@example.invalid
         head -c 50331648 /dev/urandom > big.bin
         git add -A; git commit -q -m big",
    );
    dir
}

fn assert_nothing_left(d: &TestDaemon, taps_before: usize) {
    wait_until("the run's VM to be gone", std::time::Duration::from_secs(60), || {
        d.rpc("vm.list", json!({}))["vms"] == json!([])
    });
    d.assert_no_leaked_processes();
    assert_eq!(std::fs::read_dir(d.state_dir.join("vms")).unwrap().count(), 0, "VM directory left behind");
    assert!(d.taps().len() <= taps_before.max(2), "the run's TAP is left: {:?}", d.taps());
}

#[test]
fn cancelling_vm_run_mid_prepare_over_json_rpc_or_ctrl_c_leaves_nothing() {
    let d = TestDaemon::start();
    d.register_test_image();
    let repo = big_repo();
    let path = repo.path().to_str().unwrap();
    let taps_before = d.taps().len();

    // operation.cancel while the repository is being prepared: the VM the run made is deleted.
    let op = d.rpc("vm.run_begin", json!({"path": path, "create": {"name": "halfrun", "memory_mib": 256}}));
    assert_eq!(op["kind"], "vm.run");
    assert_eq!(op["target"], "halfrun");
    wait_for_stage(&d, &op["id"], "prepare");
    let cancelled = d.rpc("operation.cancel", json!({"id": op["id"]}));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
    assert!(cancelled["error"]["message"].as_str().unwrap().contains("was deleted"), "{cancelled}");
    assert_nothing_left(&d, taps_before);

    // Ctrl-C in `banger vm run` during the prepare does the same.
    let cli = Command::new(bin("banger"))
        .args(["vm", "run", path, "--name", "ctrlrun", "--memory", "256"])
        .env("BANGER_SOCKET", &d.socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Value::Null;
    wait_until("the CLI's run to reach prepare", std::time::Duration::from_secs(180), || {
        let ops = d.rpc("operation.list", json!({}));
        running = ops["operations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == "vm.run" && o["target"] == "ctrlrun")
            .cloned()
            .unwrap_or(Value::Null);
        running["stages"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "prepare" && s["state"] == "running"))
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(cli.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = cli.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cancelling") && stderr.contains("cancelled"), "{stderr}");
    let after = d.rpc("operation.status", json!({"id": running["id"]}));
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_nothing_left(&d, taps_before);
}
