//! Randomised abuse of both front doors: arguments of every operation replaced by random JSON (wrong types,
//! unknown fields, huge and negative numbers, odd strings), random bytes and cut-off requests, clients that
//! vanish mid-message. The daemon must answer every well-formed request with a typed result or error, never
//! panic, and keep serving everyone else. Seeded, so a failure can be replayed (BANGER_FUZZ_SEED).
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use banger_e2e::*;
use tools_schema::ops::OPERATIONS;

/// xorshift64*: small, seedable, good enough to pick shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a",
            "-",
            "/",
            "..",
            "\u{0}",
            "é",
            "💥",
            " ",
            "\"",
            "\\",
            "%s",
            "$(id)",
            "\n",
            "vm",
            "debian-minimal",
            "/root/repo",
            "0755",
            "stdout",
            "{",
            "]",
        ];
        let len = self.below(12);
        (0..len).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
    }
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 7 } else { 9 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 1),
            2 => json!(self.next() as i64),
            3 => json!(-(self.below(1000) as i64)),
            4 => json!(f64::from_bits(self.next() & 0x7FEF_FFFF_FFFF_FFFF)),
            5 | 6 => json!(self.string()),
            7 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    m.insert(self.string(), self.value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
}

/// Random arguments for an operation: mostly its own field names with random values, plus strays.
fn arguments(rng: &mut Rng, schema: &Value) -> Value {
    let fields: Vec<String> = schema["properties"].as_object().map(|p| p.keys().cloned().collect()).unwrap_or_default();
    let mut args = serde_json::Map::new();
    for f in &fields {
        if rng.below(3) > 0 {
            args.insert(f.clone(), rng.value(0));
        }
    }
    if rng.below(4) == 0 {
        args.insert(rng.string(), rng.value(0));
    }
    match rng.below(10) {
        0 => rng.value(0), // not even an object
        _ => Value::Object(args),
    }
}

fn seed() -> u64 {
    std::env::var("BANGER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5e_edba_96e7)
}

/// Image builds run programs on the host; a random request that happened to be valid would start one.
fn fuzzable(method: &str) -> bool {
    !method.starts_with("image.build")
}

#[test]
fn random_arguments_to_every_operation_get_typed_answers_on_both_doors() {
    let d = TestDaemon::start();
    let mut rng = Rng(seed());
    let mut mcp = RawMcp::connect(&d.socket);
    mcp.initialize();
    let mut id = 1;
    for round in 0..6 {
        for op in OPERATIONS.iter().filter(|op| fuzzable(op.method)) {
            let schema = serde_json::to_value((op.params_schema)()).unwrap();
            let args = arguments(&mut rng, &schema);

            // JSON-RPC: a result or a JSON-RPC error with our typed data, never a dropped connection.
            let r = d.rpc_raw(op.method, args.clone());
            if let Some(e) = r.get("error") {
                let code = e["code"].as_i64().unwrap_or_default();
                assert!(
                    e["data"]["code"].is_string() || [-32700, -32600, -32601, -32602].contains(&code),
                    "round {round} {} {args}: untyped error {r}",
                    op.method
                );
            } else {
                assert!(r.get("result").is_some(), "{} {args}: neither result nor error: {r}", op.method);
            }

            // MCP: arguments must be an object there; anything else is the client's protocol error.
            id += 1;
            let r = mcp.request(id, "tools/call", json!({"name": op.tool_name(), "arguments": args}));
            if let Some(result) = r.get("result") {
                if result["isError"] == true {
                    let e = mcp_error(result);
                    assert!(e["code"].is_string() && e["message"].is_string(), "{} {args}: {r}", op.method);
                }
            } else {
                assert!(r["error"]["code"].is_i64(), "{} {args}: neither result nor error: {r}", op.method);
            }
        }
    }
    // Unknown tools and methods, on both doors.
    assert_eq!(d.rpc_raw("vm.\u{1F4A5}", json!({}))["error"]["code"], -32601);
    id += 1;
    let r = mcp.request(id, "tools/call", json!({"name": "rm_rf", "arguments": {}}));
    assert_eq!(mcp_error(&r["result"])["code"], "unknown_method");
    assert_eq!(d.rpc("daemon.ping", json!({}))["pid"], json!(d.pid()), "the daemon is the same process");
}

#[test]
fn garbage_bytes_cut_messages_and_vanishing_clients_never_take_the_daemon_down() {
    let d = TestDaemon::start();
    let mut rng = Rng(seed() ^ 0xdead);
    // A well-behaved client stays connected through all of it and is served at the end.
    let mut steady = RawMcp::connect(&d.socket);
    steady.initialize();
    let valid = r#"{"jsonrpc":"2.0","id":7,"method":"vm.list","params":{}}"#;
    for i in 0..120 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let bytes: Vec<u8> = match i % 4 {
            // Random bytes (either door, depending on the first byte).
            0 => (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
            // A valid HTTP request cut short.
            1 => {
                let req = format!(
                    "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{valid}",
                    valid.len()
                );
                req.as_bytes()[..rng.below(req.len() as u64) as usize].to_vec()
            }
            // An MCP message cut short, or an endless line.
            2 => {
                let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"f","version":"0"}}}"#;
                init.as_bytes()[..rng.below(init.len() as u64) as usize].to_vec()
            }
            _ => {
                let mut v = b"{\"jsonrpc\":\"2.0\",\"method\":\"".to_vec();
                v.extend((0..rng.below(1 << 20)).map(|_| b'a'));
                v
            }
        };
        // The daemon may close on us mid-write: that is a fine answer to garbage.
        let _ = s.write_all(&bytes);
        drop(s);
    }
    assert_eq!(
        steady.request(99, "tools/call", json!({"name": "vm_list", "arguments": {}}))["result"]["isError"],
        false
    );
    let (status, body) = http_post(&d.socket, valid).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"vms\""), "{body}");
    assert_eq!(d.rpc("daemon.ping", json!({}))["pid"], json!(d.pid()));
    let log = d.daemon_output();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}
