//! banger driven by MCP clients it shares no code with: the MCP Inspector CLI (npm
//! `@modelcontextprotocol/inspector`), the official Python SDK (PyPI `mcp`), and the coding agents' own CLIs
//! (Claude Code and opencode), all over `banger mcp`. scripts/test.sh installs them and exports their paths.
use std::process::Command;

use banger_e2e::*;
use tools_schema::ops::OPERATIONS;

fn inspector() -> String {
    std::env::var("BANGER_TEST_MCP_INSPECTOR")
        .expect("BANGER_TEST_MCP_INSPECTOR is not set: scripts/test.sh installs the MCP Inspector and sets it")
}

/// Runs the Inspector CLI against `banger mcp` (every toolset) for this test's daemon and returns its JSON answer.
fn inspect(d: &TestDaemon, args: &[&str]) -> Value {
    inspect_with_stderr(d, args).0
}

/// The Inspector's JSON answer and what it printed on stderr (its schema portability report goes there).
fn inspect_with_stderr(d: &TestDaemon, args: &[&str]) -> (Value, String) {
    let out = Command::new(inspector())
        .arg("--cli")
        .arg("-e")
        .arg(format!("BANGER_SOCKET={}", d.socket.display()))
        .arg("-e")
        .arg("BANGER_MCP_TOOLSETS=all")
        .arg(bin("banger"))
        .arg("mcp")
        .args(args)
        // The Inspector keeps a catalog under $HOME: keep it in the test's directory.
        .env("HOME", d.dir.path())
        .output()
        .expect("running the MCP Inspector");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let answer = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("Inspector output is not JSON ({e}): {stdout}\nstderr: {stderr}"));
    (answer, stderr)
}

/// Every tool's input and output schema passes the Inspector's portability check (`--strict` reports each
/// finding on stderr with its path): no type arrays, no untyped schemas, no remote references.
#[test]
fn every_tool_schema_passes_the_mcp_inspectors_strict_portability_check() {
    let d = TestDaemon::start();
    let (list, stderr) = inspect_with_stderr(&d, &["--method", "tools/list", "--strict"]);
    assert_eq!(list["tools"].as_array().map(Vec::len), Some(OPERATIONS.len()), "{list}");
    let findings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("Warning:") || l.starts_with("Error:") || l.contains("Path:"))
        .collect();
    assert!(findings.is_empty() && !stderr.contains("portability"), "portability findings:\n{stderr}");
}

#[test]
fn the_mcp_inspector_lists_every_tool_with_truthful_annotations_and_calls_a_read_only_one() {
    let d = TestDaemon::start();
    let list = inspect(&d, &["--method", "tools/list"]);
    let tools = list["tools"].as_array().expect("tools/list answered");
    assert_eq!(tools.len(), OPERATIONS.len(), "one tool per operation");
    for op in OPERATIONS {
        let name = op.tool_name();
        let tool = tools.iter().find(|t| t["name"] == name.as_str()).unwrap_or_else(|| panic!("{name} is listed"));
        assert!(
            tool["description"].as_str().is_some_and(|s| s.len() > 20),
            "{name} has a description an agent can act on"
        );
        assert_eq!(tool["inputSchema"]["type"], "object", "{name}");
        assert!(tool["outputSchema"].is_object(), "{name} declares its output");
        let a = &tool["annotations"];
        assert_eq!(a["readOnlyHint"], op.read_only, "{name}");
        assert_eq!(a["destructiveHint"], op.destructive, "{name}");
        assert_eq!(a["idempotentHint"], op.idempotent, "{name}");
    }

    // A read-only tool, called: the typed result is the structured content.
    let status = inspect(&d, &["--method", "tools/call", "--tool-name", "daemon_status"]);
    let s = &status["structuredContent"];
    assert_eq!(s["socket"], d.socket.display().to_string(), "{status}");
    assert_eq!(s["vms_total"], 0, "{status}");
    assert!(!status["isError"].as_bool().unwrap_or(false), "{status}");
    // With arguments, and a typed error an agent can act on.
    let missing = inspect(&d, &["--method", "tools/call", "--tool-name", "vm_show", "--tool-arg", "vm=ghost"]);
    let e = mcp_error(&missing);
    assert_eq!(e["code"], "not_found", "{missing}");
    assert!(e["message"].as_str().unwrap().contains("ghost") && e["hint"].is_string(), "{missing}");
}

/// The coding agents' own CLIs (npm `@anthropic-ai/claude-code` and `opencode-ai`, the versions the
/// debian-agent image installs) see banger connected through `banger mcp`, and opencode prints nothing on
/// stderr (it once printed a warning per non-standard schema `format`, hundreds per connection). Run in the
/// test's network namespace, so whatever else they try reaches nothing beyond it; their config lives in the
/// test's folder.
#[test]
fn claude_code_and_opencode_report_banger_connected() {
    let tool = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: scripts/test.sh installs the agent CLIs"))
    };
    let (claude, opencode) = (tool("BANGER_TEST_CLAUDE"), tool("BANGER_TEST_OPENCODE"));
    let d = TestDaemon::start();
    let home = d.dir.path().join("agent-home");
    let project = d.dir.path().join("agent-project");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&project).unwrap();
    let banger = bin("banger").display().to_string();
    let socket = d.socket.display().to_string();
    let run = |program: &str, args: &[&str]| {
        let home_env = format!("HOME={}", home.display());
        let path_env = format!("PATH={}", std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &d.netns.name, "env", "-i", &home_env, &path_env])
            .args([
                "DISABLE_AUTOUPDATER=1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
                "OPENCODE_DISABLE_AUTOUPDATE=1",
            ])
            .arg(program)
            .args(args)
            .current_dir(&project);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let add_env = format!("BANGER_SOCKET={socket}");
    let (ok, out, err) =
        run(&claude, &["mcp", "add", "--scope", "user", "banger", "-e", &add_env, "--", &banger, "mcp"]);
    assert!(ok, "claude mcp add: {out}\n{err}");
    let (ok, out, err) = run(&claude, &["mcp", "list"]);
    println!("claude mcp list:\n{out}{err}");
    let line =
        out.lines().find(|l| l.starts_with("banger")).unwrap_or_else(|| panic!("banger not listed: {out}\n{err}"));
    assert!(ok && line.contains("Connected"), "claude sees banger as: {line}\n{err}");

    let config = json!({
        "$schema": "https://opencode.ai/config.json",
        "mcp": {"banger": {"type": "local", "command": [banger, "mcp"], "enabled": true, "environment": {"BANGER_SOCKET": socket}}}
    });
    std::fs::write(project.join("opencode.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let (ok, out, err) = run(&opencode, &["mcp", "list"]);
    println!("opencode mcp list:\n{out}{err}");
    let plain = strip_ansi(&out);
    let line =
        plain.lines().find(|l| l.contains("banger")).unwrap_or_else(|| panic!("banger not listed: {out}\n{err}"));
    assert!(ok && line.to_lowercase().contains("connected"), "opencode sees banger as: {line}");
    // Terminal control codes (its spinner's cursor hiding) are not output.
    assert!(strip_ansi(&err).trim().is_empty(), "opencode printed on stderr: {err:?}");
}

/// Text without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
