//! The daemon's two front doors and the CLI, against a real daemon: same typed results over MCP and
//! JSON-RPC, every operation listed with schemas, bad input rejected specifically, private socket.
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use banger_e2e::*;
use rmcp::model::CallToolRequestParams;

/// Small stand-in files: registration copies and fingerprints files but never boots them.
fn fake_image_files(d: &TestDaemon) -> (String, String) {
    let kernel = d.dir.path().join("fake-kernel");
    let rootfs = d.dir.path().join("fake-rootfs.ext4");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    std::fs::write(&rootfs, vec![7u8; 4096]).unwrap();
    (kernel.display().to_string(), rootfs.display().to_string())
}

async fn mcp_client(d: &TestDaemon) -> McpClient {
    d.mcp_client(&[]).await
}

async fn mcp_client_with(d: &TestDaemon, args: &[&str]) -> McpClient {
    d.mcp_client(args).await
}

/// The default toolset is what an agent's context pays for: at most 15 tools, at most 12 KB of names,
/// descriptions and input schemas (what Claude-style clients show the model), at most 40 KB in all; `all`
/// lists every operation. Prints the real sizes per toolset (docs/AGENTS.md quotes them).
#[tokio::test(flavor = "multi_thread")]
async fn the_default_toolset_fits_an_agents_context_and_all_lists_every_operation() {
    use tools_schema::toolsets::{Toolset, DEFAULT_TOOLSETS};
    let d = TestDaemon::start();
    let sizes = |tools: &[rmcp::model::Tool]| {
        let context: usize = tools
            .iter()
            .map(|t| {
                t.name.len()
                    + t.description.as_deref().map_or(0, str::len)
                    + serde_json::to_string(&t.input_schema).unwrap().len()
            })
            .sum();
        (tools.len(), context, serde_json::to_string(tools).unwrap().len())
    };
    let client = mcp_client(&d).await;
    let instructions = client.peer_info().and_then(|i| i.instructions.clone()).unwrap_or_default();
    assert!(
        instructions.contains("Toolsets listed: sandbox.") && instructions.contains("--toolsets"),
        "{instructions}"
    );
    let tools = client.list_all_tools().await.unwrap();
    let want: Vec<String> = Toolset::listed(DEFAULT_TOOLSETS).map(|op| op.tool_name()).collect();
    let names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, want);
    let (count, context, total) = sizes(&tools);
    println!("toolset sandbox (default): {count} tools, {context} bytes in context, {total} bytes in all");
    assert!(count <= 15 && context <= 12 << 10 && total <= 40 << 10, "{count} tools, {context} B, {total} B");
    // A tool that is not listed can still be called by name.
    let r = client.call_tool(CallToolRequestParams::new("daemon_ping")).await.unwrap();
    assert_eq!(r.is_error, Some(false));
    client.cancel().await.unwrap();
    for set in [Toolset::Vms, Toolset::Images, Toolset::Admin] {
        let client = mcp_client_with(&d, &["--toolsets", set.name()]).await;
        let tools = client.list_all_tools().await.unwrap();
        let (count, context, total) = sizes(&tools);
        println!("toolsets sandbox,{}: {count} tools, {context} bytes in context, {total} bytes in all", set.name());
        assert_eq!(count, Toolset::listed(&[Toolset::Sandbox, set]).count());
        client.cancel().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_over_stdio_lists_every_operation_with_schemas_and_truthful_annotations() {
    let d = TestDaemon::start();
    let client = mcp_client_with(&d, &["--toolsets", "all"]).await;
    let info = client.peer_info().expect("server info after initialize");
    assert_eq!(info.server_info.as_ref().map(|s| s.name.as_str()), Some("banger"));
    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    for op in tools_schema::ops::OPERATIONS {
        let t = tools
            .iter()
            .find(|t| t.name == op.tool_name())
            .unwrap_or_else(|| panic!("{} missing from {names:?}", op.tool_name()));
        assert_eq!(t.input_schema.get("type"), Some(&json!("object")), "{} input schema", op.method);
        assert!(t.output_schema.is_some(), "{} has no output schema", op.method);
        let a = t.annotations.as_ref().expect("annotations");
        assert_eq!(a.read_only_hint, Some(op.read_only), "{}", op.method);
        assert_eq!(a.destructive_hint, Some(op.destructive), "{}", op.method);
    }
    assert_eq!(tools.len(), tools_schema::ops::OPERATIONS.len());
    // Spot-check that the annotations say what the operations do.
    let by = |n: &str| tools.iter().find(|t| t.name == n).unwrap().annotations.clone().unwrap();
    assert_eq!(by("vm_delete").destructive_hint, Some(true));
    assert_eq!(by("vm_list").read_only_hint, Some(true));
    assert_eq!(by("vm_create").read_only_hint, Some(false));
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_operation_returns_the_same_typed_result_over_mcp_and_json_rpc() {
    let d = TestDaemon::start();
    let (kernel, rootfs) = fake_image_files(&d);
    d.rpc("image.register", json!({"name": "fake", "kernel": kernel, "rootfs": rootfs}));
    let over_rpc = d.rpc("image.list", json!({}));
    let client = mcp_client(&d).await;
    let r = client.call_tool(CallToolRequestParams::new("image_list")).await.unwrap();
    assert_eq!(r.is_error, Some(false));
    let over_mcp = r.structured_content.expect("structured content");
    assert_eq!(over_mcp, over_rpc);
    let list: tools_schema::image::ImageList = serde_json::from_value(over_mcp).expect("typed result");
    assert_eq!(list.images.len(), 1);
    assert!(list.images[0].is_default, "the first image becomes the default");
    // And a typed error is the same kind on both doors.
    let mcp_err = client
        .call_tool(
            CallToolRequestParams::new("vm_show").with_arguments(json!({"vm": "ghost"}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_eq!(mcp_err.is_error, Some(true));
    assert!(mcp_err.structured_content.is_none(), "errors do not pretend to match the output schema");
    assert_eq!(mcp_error(&serde_json::to_value(&mcp_err).unwrap())["code"], "not_found");
    let rpc_err = d.rpc_raw("vm.show", json!({"vm": "ghost"}));
    assert_eq!(rpc_err["error"]["data"]["code"], "not_found");
    assert_eq!(next_steps(&rpc_err["error"]["data"]), [("vm.list".to_string(), json!({}))], "{rpc_err}");
    // Over MCP the same step is named as the tool it is.
    let over_mcp = mcp_error(&serde_json::to_value(&mcp_err).unwrap());
    assert_eq!(over_mcp["next"][0]["tool"], "vm_list", "{over_mcp}");
    assert!(over_mcp["hint"].as_str().unwrap().contains("call vm_list {}"), "{over_mcp}");
    client.cancel().await.unwrap();
}

#[test]
fn bad_input_gets_specific_errors_on_json_rpc_and_never_crashes_the_daemon() {
    let d = TestDaemon::start();
    let err = |method: &str, params: Value| d.rpc_raw(method, params)["error"].clone();

    let e = err("vm.explode", json!({}));
    assert_eq!(e["code"], -32601, "unknown method: {e}");

    let e = err("vm.create", json!({"vcpus": "two"}));
    assert_eq!(e["code"], -32602, "wrong type: {e}");
    assert_eq!(e["data"]["code"], "invalid_argument");
    assert!(e["message"].as_str().unwrap().contains("invalid type"), "{e}");

    let e = err("vm.show", json!({}));
    assert!(e["message"].as_str().unwrap().contains("missing field `vm`"), "missing field: {e}");

    let e = err("vm.create", json!({"vcpus": 0}));
    assert!(e["message"].as_str().unwrap().contains("vcpus must be between 1 and 32"), "range: {e}");

    let e = err("vm.create", json!({"name": "Bad_Name"}));
    assert!(e["message"].as_str().unwrap().contains("is invalid"), "name: {e}");

    let e = err("vm.create", json!({"cpus": 2}));
    assert!(e["message"].as_str().unwrap().contains("unknown field `cpus`"), "unknown field: {e}");

    let e = err("vm.exec", json!({"vm": "x", "command": []}));
    assert_eq!(e["data"]["code"], "invalid_argument", "empty command: {e}");

    // Not JSON at all.
    let (status, body) = http_post(&d.socket, "{this is not json").unwrap();
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], -32700, "{body}");

    // 17 MiB of params: over the 16 MiB limit.
    let big = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"vm.show","params":{{"vm":"{}"}}}}"#, "a".repeat(17 << 20));
    let (status, body) = http_post(&d.socket, &big).unwrap();
    assert!(status == 413 || body.contains("too big"), "oversize request: {status} {}", &body[..body.len().min(200)]);

    // A client that vanishes mid-request.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"jsonrpc\"").unwrap();
    }

    assert_eq!(d.rpc("daemon.ping", json!({}))["pid"], json!(d.pid()), "daemon still serves");
}

#[test]
fn bad_input_gets_specific_errors_on_mcp_and_never_crashes_the_daemon() {
    let d = TestDaemon::start();
    let mut m = RawMcp::connect(&d.socket);
    m.initialize();
    let r = m.request(1, "tools/call", json!({"name": "vm_explode", "arguments": {}}));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(mcp_error(&r["result"])["code"], "unknown_method");

    let r = m.request(2, "tools/call", json!({"name": "vm_create", "arguments": {"memory_mib": "lots"}}));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(mcp_error(&r["result"])["code"], "invalid_argument");
    assert!(mcp_error(&r["result"])["message"].as_str().unwrap().contains("memory_mib"), "{r}");

    let r = m.request(3, "tools/call", json!({"name": "vm_show", "arguments": {}}));
    assert!(mcp_error(&r["result"])["message"].as_str().unwrap().contains("missing field `vm`"), "{r}");

    let r = m.request(4, "no/such/method", json!({}));
    assert_eq!(r["error"]["code"], -32601, "{r}");

    // Malformed JSON on the wire, then an oversize line: the session may end, the daemon must not.
    m.send_line("{not json");
    m.send_line(&format!(
        r#"{{"jsonrpc":"2.0","id":9,"method":"tools/list","params":{{"x":"{}"}}}}"#,
        "a".repeat(17 << 20)
    ));
    drop(m);

    let mut m2 = RawMcp::connect(&d.socket);
    m2.initialize();
    let r = m2.request(1, "tools/call", json!({"name": "daemon_ping", "arguments": {}}));
    assert_eq!(r["result"]["structuredContent"]["pid"], json!(d.pid()), "{r}");
}

#[test]
fn the_socket_is_private_and_other_users_are_refused_by_credentials() {
    let d = TestDaemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    // Open the file permissions up, as a careless admin might: the credential check must still refuse.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(bin("banger"))
        .args(["daemon", "ping"])
        .env("BANGER_SOCKET", &d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("uid 65534") && stderr.contains("the daemon refused this user"), "stderr: {stderr}");
    // Root (the owner here) is still served.
    assert!(d.cli(&["daemon", "ping"]).status.success());
}

#[test]
fn every_binary_reports_the_same_build() {
    let d = TestDaemon::start();
    let v = d.cli_json(&["version"]);
    assert_eq!(v["cli"], v["daemon"], "CLI and daemon builds differ: {v}");
    let daemon_cli = std::process::Command::new(bin("bangerd")).arg("--build-info").output().unwrap();
    let daemon_build: Value = serde_json::from_slice(&daemon_cli.stdout).unwrap();
    assert_eq!(daemon_build, v["cli"]);
    let status = d.cli_json(&["daemon", "status"]);
    assert_eq!(status["build"], v["cli"]);
    assert_eq!(status["socket"], json!(d.socket.display().to_string()));
    assert!(!v["cli"]["commit"].as_str().unwrap().is_empty());
}

#[test]
fn doctor_names_the_vmm_and_why() {
    let d = TestDaemon::start();
    let r = d.rpc("doctor.run", json!({}));
    let vmm = &r["vmm"];
    assert!(["qemu", "firecracker"].contains(&vmm["vmm"].as_str().unwrap()));
    let accel = vmm["acceleration"].as_str().unwrap();
    // On hosts without hardware KVM, QEMU with TCG is the only way guests boot.
    if accel != "hardware_kvm" {
        assert_eq!(vmm["vmm"], "qemu");
        assert_eq!(vmm["qemu_accel"], "tcg");
    }
    assert!(vmm["reason"].as_str().unwrap().len() > 20);
    let checks = r["checks"].as_array().unwrap();
    let check = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap_or_else(|| panic!("no {n} check"));
    assert_eq!(check("qemu-system-x86_64")["status"], "pass");
    // No image is registered in a fresh daemon: the doctor fails that check and says how to fix it.
    assert_eq!(check("default-image")["status"], "fail");
    assert!(check("default-image")["fix"].as_str().unwrap().contains("quickstart"));
    assert_eq!(r["ok"], false);
    let out = d.cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("VMM: "));
    // The host's network pieces are checked for real: the bridge, banger's nftables table, and its DNS
    // server answering on the gateway.
    for name in ["tun", "bridge", "nftables", "dns", "guest-channel", "mkfs.ext4", "git"] {
        assert_eq!(check(name)["status"], "pass", "{}", check(name));
    }
    // Disk space depends on the machine; it is measured, never failed here.
    assert_ne!(check("state-dir")["status"], "fail", "{}", check("state-dir"));
    assert!(check("state-dir")["detail"].as_str().unwrap().contains("GiB free"));
    assert!(check("dns")["detail"].as_str().unwrap().contains(GATEWAY), "{}", check("dns"));
}

#[test]
fn doctor_fails_clearly_with_the_fix_when_a_prerequisite_is_missing() {
    // The vsock channel needs vhost-device-vsock, which set-up puts in the cache's bin folder; with no
    // bin_dirs it is nowhere to be found. And the guest kernel for image builds points at nothing.
    let d = TestDaemon::start_with_config("bin_dirs = []\nqemu_channel = \"vsock\"\nkernel = \"/nonexistent/vmlinuz\"");
    let r = d.rpc("doctor.run", json!({}));
    let checks = r["checks"].as_array().unwrap();
    let check = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap_or_else(|| panic!("no {n} check")).clone();
    let channel = check("guest-channel");
    assert_eq!(channel["status"], "fail", "{channel}");
    assert!(channel["detail"].as_str().unwrap().contains("vhost-device-vsock"), "{channel}");
    assert!(channel["fix"].as_str().unwrap().contains("setup-host.sh"), "{channel}");
    let kernel = check("guest-kernel");
    assert_eq!(kernel["status"], "warn", "{kernel}");
    assert!(kernel["detail"].as_str().unwrap().contains("/nonexistent/vmlinuz"), "{kernel}");
    assert_eq!(r["ok"], false);
    // The CLI prints the failure and its fix, and exits non-zero.
    let out = d.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("[FAIL] guest-channel") && text.contains("fix: run scripts/setup-host.sh"), "{text}");
}

#[test]
fn the_daemon_manages_a_host_block_in_the_ssh_config_and_keeps_the_rest() {
    let mut d = TestDaemon::start();
    let path = d.dir.path().join("ssh_config");
    let text = std::fs::read_to_string(&path).expect("the daemon wrote the ssh config");
    assert!(text.contains("Host *.vm"), "{text}");
    assert!(text.contains(&d.state_dir.join("ssh/id_ed25519").display().to_string()), "{text}");
    // The user edits the file; a restarted daemon keeps their entries and its single block.
    std::fs::write(&path, format!("{text}\nHost mine\n    User me\n")).unwrap();
    d.restart();
    let after = std::fs::read_to_string(&path).unwrap();
    assert_eq!(after.matches("Host *.vm").count(), 1, "{after}");
    assert!(after.contains("Host mine\n    User me\n"), "{after}");
}

#[test]
fn the_cli_offers_completions_and_every_command_has_an_example() {
    let d = TestDaemon::start();
    let out = d.cli(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("_banger") && script.contains("session"), "{script}");
    // Walk the whole command tree: every leaf command's help shows an example.
    fn walk(d: &TestDaemon, path: Vec<String>, missing: &mut Vec<String>) {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = String::from_utf8_lossy(&d.cli(&args).stdout).into_owned();
        let subs: Vec<String> = help
            .split("Commands:\n")
            .nth(1)
            .map(|rest| {
                rest.lines()
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                    .filter(|c| c != "help")
                    .collect()
            })
            .unwrap_or_default();
        if subs.is_empty() {
            if !help.contains("Example") {
                missing.push(path.join(" "));
            }
        } else {
            for s in subs {
                let mut p = path.clone();
                p.push(s);
                walk(d, p, missing);
            }
        }
    }
    let mut missing = vec![];
    walk(&d, vec![], &mut missing);
    assert!(missing.is_empty(), "commands without an example in --help: {missing:?}");
}
