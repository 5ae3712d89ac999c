//! Issue 18: the mistakes an agent makes, made over MCP against a real guest. Each error names the thing the
//! caller got wrong, says what is wrong with it, and names the tool call that helps (a next step, in the
//! hint too), never a `banger` command; the CLI shows the same errors with `banger` command lines.
use banger_e2e::*;
use rmcp::model::CallToolRequestParams;
use tools_schema::ops::OperationSpec;

async fn call(c: &McpClient, tool: &str, args: Value) -> Value {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args.as_object().unwrap().clone());
    serde_json::to_value(c.call_tool(params).await.unwrap()).unwrap()
}

/// The typed error of `r`, after checking it names each of `what` (in its message or hint) and offers `tool`
/// as a next step, named as the tool it is in the hint, with no CLI command anywhere.
fn helpful(mistake: &str, r: &Value, what: &[&str], tool: &str) -> Value {
    let e = mcp_error(r);
    let text = format!("{} {}", e["message"].as_str().unwrap(), e["hint"].as_str().unwrap_or_default());
    for w in what {
        assert!(text.contains(w), "{mistake}: `{w}` is not named: {e}");
    }
    for cli in ["banger vm", "banger image", "banger daemon", "banger doctor", "--"] {
        assert!(!text.contains(cli), "{mistake}: names `{cli}`, which an MCP agent does not have: {e}");
    }
    let tools: Vec<&str> = e["next"].as_array().into_iter().flatten().filter_map(|s| s["tool"].as_str()).collect();
    assert!(tools.contains(&tool), "{mistake}: no next step calls {tool}: {e}");
    for t in &tools {
        assert!(OperationSpec::by_tool_name(t).is_some(), "{mistake}: {t} is no tool");
    }
    assert!(e["hint"].as_str().unwrap().contains(&format!("call {tool} ")), "{mistake}: the hint names no {tool}: {e}");
    e
}

/// The arguments of the next step that calls `tool`.
fn next_arguments(e: &Value, tool: &str) -> Value {
    e["next"].as_array().unwrap().iter().find(|s| s["tool"] == tool).unwrap()["arguments"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn nine_mistakes_over_mcp_each_get_what_was_wrong_and_the_tool_that_helps() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "dev", "memory_mib": 256}));
    let repo = tempfile::Builder::new().prefix("banger-mistakes-").tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").args(args).current_dir(repo.path()).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    git(&["init", "-q", "-b", "main", "."]);
    std::fs::write(repo.path().join("README.md"), "hi\n").unwrap();
    git(&["add", "-A"]);
    git(&["-c", "user.name=Dev", "-c", "user.email=dev@example.invalid", "commit", "-qm", "first"]);
    let repo_path = repo.path().display().to_string();
    let not_a_repo = tempfile::tempdir().unwrap();
    let not_a_repo_path = not_a_repo.path().display().to_string();
    let c = d.mcp_client(&[]).await;

    // 1. A VM that does not exist.
    let r = call(&c, "vm_exec", json!({"vm": "nosuchvm", "command": ["true"]})).await;
    helpful("unknown VM", &r, &["nosuchvm"], "vm_list");

    // 2. A program the guest does not have: the error says it is the program (not the directory).
    let r = call(&c, "vm_exec", json!({"vm": "dev", "command": ["pytest", "-q"]})).await;
    let e = helpful("missing program", &r, &["pytest", "PATH"], "image_list");
    assert!(!e["message"].as_str().unwrap().contains("/root"), "the directory is not what is wrong: {e}");
    let r = call(&c, "vm_exec", json!({"vm": "dev", "command": ["ls"], "cwd": "/root/nope"})).await;
    helpful("missing directory", &r, &["/root/nope", "does not exist"], "vm_exec");

    // 3. A path that is not a repository.
    let r = call(&c, "workspace_prepare", json!({"vm": "dev", "path": not_a_repo_path})).await;
    let e = helpful("not a repository", &r, &[&not_a_repo_path, "git work tree"], "workspace_prepare");
    assert_eq!(next_arguments(&e, "workspace_prepare")["vm"], "dev", "the rest of the call is kept: {e}");

    // 4. A relative path.
    let r = call(&c, "workspace_prepare", json!({"vm": "dev", "path": "repo"})).await;
    helpful("relative path", &r, &["`repo`", "absolute"], "workspace_prepare");

    // 5. Input for a session that has exited: said as such, by the name the caller gave it.
    let started = call(
        &c,
        "session_start",
        json!({"vm": "dev", "name": "short", "command": ["sh", "-c", "read l; echo got $l"]}),
    )
    .await;
    assert_eq!(started["isError"], false, "{started}");
    let sent =
        call(&c, "session_send", json!({"session": "short", "vm": "dev", "data": "x\n", "wait_ms": 20000})).await;
    let sent = &sent["structuredContent"];
    let said: String =
        sent["output"]["chunks"].as_array().unwrap().iter().map(|c| c["data"].as_str().unwrap()).collect();
    assert_eq!(said, "got x\n", "session_send returned what followed: {sent}");
    let mut offset = sent["output"]["next_offset"].clone();
    loop {
        let logs =
            call(&c, "session_logs", json!({"session": "short", "vm": "dev", "offset": offset, "wait_ms": 5000})).await;
        let logs = &logs["structuredContent"];
        offset = logs["next_offset"].clone();
        if logs["state"] == "exited" {
            assert_eq!(logs["exit_code"], 0, "an exited session's logs carry its exit code: {logs}");
            break;
        }
    }
    let r = call(&c, "session_send", json!({"session": "short", "vm": "dev", "data": "more\n"})).await;
    let e = helpful("send to an exited session", &r, &["`short`", "exited with code 0"], "session_logs");
    assert!(!e["message"].as_str().unwrap().contains("Broken pipe"), "{e}");

    // 6. Memory below the range: the same call with the smallest memory there is.
    let r = call(&c, "vm_create", json!({"name": "small", "memory_mib": 64})).await;
    let e = helpful("memory below the range", &r, &["memory_mib", "64"], "vm_create");
    assert_eq!(next_arguments(&e, "vm_create"), json!({"name": "small", "memory_mib": 128}));

    // 7. Memory as "2G": the same call with the number of MiB.
    let r = call(&c, "vm_create", json!({"name": "big", "memory_mib": "2G"})).await;
    let e = helpful("memory as 2G", &r, &["memory_mib", "2G"], "vm_create");
    assert_eq!(next_arguments(&e, "vm_create"), json!({"name": "big", "memory_mib": 2048}));

    // 8. A parameter that does not exist: the same call with the one meant.
    let r = call(&c, "vm_create", json!({"name": "big", "memory": 512})).await;
    let e = helpful("unknown parameter", &r, &["`memory`"], "vm_create");
    assert_eq!(next_arguments(&e, "vm_create"), json!({"name": "big", "memory_mib": 512}));

    // 9. A second prepare without force: export first, or prepare with force.
    let first = call(&c, "workspace_prepare", json!({"vm": "dev", "path": repo_path})).await;
    assert_eq!(first["isError"], false, "{first}");
    let r = call(&c, "workspace_prepare", json!({"vm": "dev", "path": repo_path})).await;
    let e = helpful("second prepare", &r, &["/root/repo", "force"], "workspace_prepare");
    assert_eq!(next_arguments(&e, "workspace_prepare"), json!({"vm": "dev", "path": repo_path, "force": true}));
    assert!(e["next"].as_array().unwrap().iter().any(|s| s["tool"] == "workspace_export"), "{e}");
    c.cancel().await.unwrap();
    assert_eq!(d.rpc("vm.list", json!({}))["vms"].as_array().unwrap().len(), 1, "no mistake made a VM");

    // The CLI shows the same errors with its own commands.
    let out = d.cli(&["vm", "exec", "nosuchvm", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("next: banger vm list"), "{err}");
    let out = d.cli(&["vm", "session", "send", "short", "--vm", "dev", "more"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited with code 0") && err.contains("next: banger vm session logs short --vm dev"), "{err}");
    let out = d.cli(&["vm", "workspace", "prepare", "dev", &repo_path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("banger vm workspace prepare dev {repo_path} --force")), "{err}");
    d.rpc("vm.delete", json!({"vm": "dev"}));
    d.assert_no_leaked_processes();
}
