//! Harness for banger's end-to-end tests: a real bangerd per test, in a network namespace the test
//! creates, with its own state directory, talking to real guests.
//!
//! Guest tests need the boot assets that `scripts/test.sh` prepares and exports as `BANGER_TEST_KERNEL`,
//! `BANGER_TEST_INITRD` and `BANGER_TEST_ROOTFS`; without them they fail and say so (they never skip
//! silently). Everything a test starts is ended by PID when its `TestDaemon` drops, and the namespace is
//! deleted.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

/// A connected MCP client (`TestDaemon::mcp_client`).
pub type McpClient = rmcp::service::RunningService<rmcp::RoleClient, ()>;

/// The workspace's built binaries (built by `cargo build --workspace` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built: run `cargo build --workspace` first (scripts/test.sh does)", p.display());
    p
}

/// Boot assets for guest tests.
pub struct TestImage {
    pub kernel: String,
    pub kernel_elf: String,
    /// None for banger's lean kernel, which needs no initramfs.
    pub initrd: Option<String>,
    pub rootfs: String,
    pub work_seed: String,
}

pub fn test_image() -> TestImage {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: guest tests need the boot assets that scripts/test.sh builds; run the suite with scripts/test.sh")
        })
    };
    TestImage {
        kernel: var("BANGER_TEST_KERNEL"),
        initrd: std::env::var("BANGER_TEST_INITRD").ok().filter(|v| !v.is_empty()),
        rootfs: var("BANGER_TEST_ROOTFS"),
        kernel_elf: var("BANGER_TEST_KERNEL_ELF"),
        work_seed: var("BANGER_TEST_WORK_SEED"),
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The typed error of a failed MCP tool call (`isError`): `{code, message, hint}`, carried as JSON text.
pub fn mcp_error(result: &Value) -> Value {
    assert_eq!(result["isError"], true, "expected a failed tool call: {result}");
    let text = result["content"][0]["text"].as_str().unwrap_or_else(|| panic!("error text in {result}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("error text is not JSON ({e}): {text}"))
}

/// The next steps of a typed error (`{code, message, hint, next}`) as `(method, arguments)`.
pub fn next_steps(e: &Value) -> Vec<(String, Value)> {
    e["next"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| (s["method"].as_str().unwrap_or_default().to_string(), s["arguments"].clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The bridge gateway of the default network config (the host's address on the VM network).
pub const GATEWAY: &str = "10.254.77.1";

/// Polls `cond` every 50 ms until it holds; fails the test, naming `what`, after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A field of /proc/PID/status (`Uid`, `Seccomp`, `NoNewPrivs`, ...), as the kernel writes it.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Whether a process is alive: it exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// A network namespace owned by one test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    // Not `Default`: making one creates a kernel object, which a default value should not do.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Netns {
        let name = format!("banger-t{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let st = Command::new("ip").args(["netns", "add", &name]).status().expect("running ip netns add");
        assert!(st.success(), "ip netns add {name} failed (tests need root and iproute2)");
        let _ = Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]).status();
        // Processes run with `ip netns exec` see this resolv.conf: banger's DNS on the bridge gateway, so the
        // host side of a test resolves `<name>.vm` the way a configured workstation would.
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {GATEWAY}\noptions timeout:1 attempts:2\n"))
            .unwrap();
        Netns { name }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub netns: Netns,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    child: Option<Child>,
    extra_config: String,
}

impl TestDaemon {
    /// Starts bangerd in a fresh namespace and state directory and waits until it answers.
    pub fn start() -> TestDaemon {
        Self::start_with_config("")
    }

    /// Like `start`, with extra lines for the daemon's config file.
    pub fn start_with_config(extra: &str) -> TestDaemon {
        let dir = tempfile::Builder::new().prefix("banger-e2e-").tempdir().expect("tempdir");
        let socket = dir.path().join("bangerd.sock");
        let state_dir = dir.path().join("state");
        let mut d =
            TestDaemon { netns: Netns::new(), socket, state_dir, child: None, dir, extra_config: extra.to_string() };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("bangerd.out")).unwrap();
        // An explicit (empty) config: a test never picks up the host's /etc/banger/config.toml.
        let config = self.dir.path().join("config.toml");
        if !config.exists() {
            // Never the real ~/.ssh/config: the managed block goes into the test's own directory.
            let ssh = self.dir.path().join("ssh_config");
            let mut text = format!("ssh_config = \"{}\"\n", ssh.display());
            // Image builds put this agent into images and boot them with the test kernel.
            for (key, var) in [
                ("agent_binary", "BANGER_TEST_AGENT"),
                ("kernel", "BANGER_TEST_KERNEL"),
                ("kernel_elf", "BANGER_TEST_KERNEL_ELF"),
                ("initrd", "BANGER_TEST_INITRD"),
            ] {
                if let Ok(v) = std::env::var(var) {
                    if !self.extra_config.contains(&format!("{key} =")) {
                        text.push_str(&format!("{key} = \"{v}\"\n"));
                    }
                }
            }
            text.push_str(&self.extra_config);
            text.push('\n');
            // A template build after every first cold boot (and a pooled VM per daemon) would double the CPU
            // every guest test needs: the warm-start tests turn them on or build templates explicitly.
            if !self.extra_config.contains("[warm]") {
                text.push_str("[warm]\nauto_build = false\npool_size = 0\n");
            }
            // Guests never get the real user's logins: sync from an empty home in the test's directory.
            if !self.extra_config.contains("[guest_sync]") {
                text.push_str(&format!("[guest_sync]\nhome = \"{}\"\n", self.dir.path().join("home").display()));
            }
            std::fs::write(&config, text).unwrap();
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns.name])
            .arg(bin("bangerd"))
            .args(["--log-level", "debug"])
            .env("BANGER_SOCKET", &self.socket)
            .env("BANGER_STATE_DIR", &self.state_dir)
            .env("BANGER_CONFIG", &config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting bangerd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if self.try_ping().is_some() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bangerd exited ({st}) before answering:\n{}", self.daemon_output());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "bangerd did not answer in 20s:\n{}",
                self.daemon_output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_ping(&self) -> Option<Value> {
        let (status, body) =
            http_post(&self.socket, &json!({"jsonrpc":"2.0","id":1,"method":"daemon.ping"}).to_string()).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    pub fn daemon_output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bangerd.out")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Stops the daemon with SIGTERM (VMs keep running) and starts a new one on the same state.
    pub fn restart(&mut self) {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        self.spawn();
    }

    /// Stops the daemon with SIGTERM and leaves it stopped (a clean stop ends pooled VMs).
    pub fn stop(&mut self) {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    }

    /// SIGKILLs the daemon mid-whatever and starts a new one on the same state.
    pub fn crash_and_restart(&mut self) {
        self.crash_and_restart_with(|| {});
    }

    /// Like `crash_and_restart`, running `while_down` between the crash and the restart.
    pub fn crash_and_restart_with(&mut self, while_down: impl FnOnce()) {
        self.stop_daemon(nix::sys::signal::Signal::SIGKILL);
        while_down();
        self.spawn();
    }

    fn stop_daemon(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Runs the `banger` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("banger")).args(args).env("BANGER_SOCKET", &self.socket).output().expect("running banger")
    }

    /// Runs the CLI and returns its JSON output, failing the test on a non-zero exit.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "banger {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("banger {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Calls a JSON-RPC method over plain HTTP POST; returns the whole response object.
    pub fn rpc_raw(&self, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string();
        let (status, text) = http_post(&self.socket, &body).expect("HTTP POST to the daemon");
        assert_eq!(status, 200, "HTTP status for {method}: {text}");
        serde_json::from_str(&text).expect("JSON-RPC response is JSON")
    }

    /// Calls a JSON-RPC method and returns its result, failing the test on an error.
    pub fn rpc(&self, method: &str, params: Value) -> Value {
        let r = self.rpc_raw(method, params);
        match r.get("result") {
            Some(v) => v.clone(),
            None => panic!("{method} failed: {r}"),
        }
    }

    /// Runs a shell script in a guest (60 s timeout) and returns the exec result.
    pub fn guest_sh(&self, vm: &str, script: &str) -> Value {
        self.rpc("vm.exec", json!({"vm": vm, "command": ["sh", "-c", script], "timeout_secs": 60}))
    }

    /// Replaces a running guest's agent server with the hostile fake agent (`tests/fake-agent`), as a root
    /// guest could: the binary is written in with `vm.file_write`, bind-mounted over the agent's path, and
    /// the real server is killed, so PID 1 restarts the fake on the channel. `behaviours` maps request ops
    /// to misbehaviours (see the fake agent's docs); change them later with `set_fake_agent`. Returns once
    /// the fake answers.
    pub fn install_fake_agent(&self, vm: &str, behaviours: Value) {
        let path = std::env::var("BANGER_TEST_FAKE_AGENT")
            .expect("BANGER_TEST_FAKE_AGENT is not set: run the attack tests with scripts/test.sh");
        let bytes = std::fs::read(&path).expect("reading the fake agent");
        const CHUNK: usize = 8 << 20;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            use base64::Engine as _;
            let content = base64::engine::general_purpose::STANDARD.encode(chunk);
            self.rpc(
                "vm.file_write",
                json!({"vm": vm, "path": "/root/banger-fake-agent", "content": content, "encoding": "base64",
                       "mode": "0755", "append": i > 0}),
            );
        }
        self.set_fake_agent(vm, behaviours.clone());
        // The exec answers first; a detached child then swaps the binary and kills the real server (its parent).
        self.guest_ok(
            vm,
            "mount --bind /root/banger-fake-agent /usr/local/bin/banger-agent &&              setsid sh -c 'sleep 0.5; kill -9 '$PPID >/dev/null 2>&1 </dev/null &",
        );
        wait_until("the fake agent answers", Duration::from_secs(60), || {
            let r = self.rpc_raw(
                "vm.exec",
                json!({"vm": vm, "command": ["sh", "-c", "echo $BANGER_FAKE_AGENT"], "timeout_secs": 10}),
            );
            r["result"]["stdout"] == "1\n"
        });
    }

    /// Sets the fake agent's misbehaviours (read afresh for every request).
    pub fn set_fake_agent(&self, vm: &str, behaviours: Value) {
        self.rpc(
            "vm.file_write",
            json!({"vm": vm, "path": "/run/banger-fake-agent.json", "content": behaviours.to_string()}),
        );
    }

    /// Peak resident memory of the daemon so far (VmHWM), in bytes.
    pub fn daemon_peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Runs a shell script in a guest, asserts it succeeded, and returns its stdout.
    pub fn guest_ok(&self, vm: &str, script: &str) -> String {
        let r = self.guest_sh(vm, script);
        assert_eq!(r["exit_code"], 0, "`{script}` in {vm}: {r}");
        r["stdout"].as_str().unwrap().to_string()
    }

    /// `banger vm ssh VM -- ARGS` from the daemon's namespace, retried for up to 30 s while sshd starts.
    pub fn vm_ssh(&self, vm: &str, args: &[&str]) -> Output {
        let socket = format!("BANGER_SOCKET={}", self.socket.display());
        let banger = bin("banger");
        let mut cmd = vec!["env", &socket, banger.to_str().unwrap(), "vm", "ssh", vm, "--"];
        cmd.extend_from_slice(args);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.netns.exec(&cmd);
            if out.status.success() || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Registers the guest test image as the default image.
    pub fn register_test_image(&self) -> Value {
        let img = test_image();
        self.rpc(
            "image.register",
            json!({"name": "test", "kernel": img.kernel, "kernel_elf": img.kernel_elf, "initrd": img.initrd, "rootfs": img.rootfs,
                   "work_seed": img.work_seed, "make_default": true}),
        )
    }

    /// banger's TAP devices in this test's namespace.
    pub fn taps(&self) -> Vec<String> {
        let out = self.netns.exec(&["ip", "-o", "link", "show"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("bgtap"))
            .collect()
    }

    /// Pids of live processes whose command line mentions this test's directory (VMMs and helpers).
    pub fn processes_of_this_test(&self) -> Vec<(u32, String)> {
        let marker = self.dir.path().to_string_lossy().to_string();
        let mut found = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&marker) {
                    found.push((pid, cmd));
                }
            }
        }
        found
    }

    /// The pid of a VM's QEMU (found by its process marker, from `vm` as an RPC result shows it).
    pub fn qemu_pid(&self, vm: &Value) -> u32 {
        let id = vm["id"].as_str().unwrap();
        let marker = format!("process=banger-vm-{id}");
        let found: Vec<u32> = self
            .processes_of_this_test()
            .into_iter()
            .filter(|(_, c)| c.contains("qemu-system") && c.contains(&marker))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(found.len(), 1, "one VMM for {id}: {:?}", self.processes_of_this_test());
        found[0]
    }

    /// An MCP client (rmcp) on `banger mcp ARGS` for this daemon, initialised.
    pub async fn mcp_client(&self, args: &[&str]) -> McpClient {
        use rmcp::ServiceExt;
        let mut cmd = tokio::process::Command::new(bin("banger"));
        cmd.arg("mcp").args(args).env("BANGER_SOCKET", &self.socket);
        let transport = rmcp::transport::TokioChildProcess::new(cmd).expect("spawn banger mcp");
        ().serve(transport).await.expect("MCP initialize through banger mcp")
    }

    /// Waits for VMM processes of this test to be gone and fails if any remain.
    pub fn assert_no_leaked_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.processes_of_this_test();
            if procs.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "leaked processes: {procs:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        // Anything this test's daemon started and left behind (a failing test may leave VMs running).
        for (pid, _) in self.processes_of_this_test() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("--- bangerd output ---\n{}", self.daemon_output());
            // The guests' consoles say why a guest never answered.
            if let Ok(vms) = std::fs::read_dir(self.state_dir.join("vms")) {
                for vm in vms.flatten() {
                    let console = std::fs::read_to_string(vm.path().join("console.log")).unwrap_or_default();
                    let tail: Vec<&str> = console.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    eprintln!("--- console of {} (last 40 lines) ---\n{}", vm.path().display(), tail.join("\n"));
                }
            }
        }
    }
}

/// A minimal HTTP/1.1 POST over a Unix socket, independent of banger's own client code.
pub fn http_post(socket: &Path, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    // A server that refuses a request (e.g. too large) answers and closes before reading it all; the
    // answer is still there to read.
    if let Err(e) = s.write_all(body.as_bytes()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe && e.kind() != std::io::ErrorKind::ConnectionReset {
            return Err(e);
        }
    }
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// A raw MCP session over the daemon socket: newline-delimited JSON, no SDK.
pub struct RawMcp {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RawMcp {
    pub fn connect(socket: &Path) -> RawMcp {
        let stream = UnixStream::connect(socket).expect("connect to daemon");
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        RawMcp { stream, buf: vec![] }
    }
    pub fn send_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }
    pub fn recv(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line).expect("MCP line is JSON");
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read from daemon");
            assert!(n > 0, "daemon closed the MCP session");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    /// Sends a request and returns the response with the same id (skipping notifications).
    pub fn request(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send_line(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string());
        loop {
            let m = self.recv();
            if m.get("id") == Some(&json!(id)) {
                return m;
            }
        }
    }
    pub fn initialize(&mut self) {
        let r = self.request(
            0,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "0"}}),
        );
        assert!(r.get("result").is_some(), "initialize failed: {r}");
        self.send_line(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }
}

/// A namespace with a web server at 198.51.100.2:8080 (TEST-NET-2, owned by the test), linked to the daemon's
/// namespace by a veth pair whose daemon end, 198.51.100.1, is the daemon namespace's default route: the
/// "outside world" NAT tests reach, without any traffic leaving the test's namespaces.
pub struct OutsideWorld {
    _ns: Netns,
    server: Child,
    log: PathBuf,
}

impl OutsideWorld {
    pub fn new(daemon_ns: &Netns) -> OutsideWorld {
        let ns = Netns::new();
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("hello.txt"), "hello from outside\n").unwrap();
        let (a, b) = (format!("vo{}", std::process::id() % 100000), format!("vi{}", std::process::id() % 100000));
        let run = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        run(&["-n", &daemon_ns.name, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &ns.name]);
        run(&["-n", &daemon_ns.name, "addr", "add", "198.51.100.1/24", "dev", &a]);
        run(&["-n", &daemon_ns.name, "link", "set", &a, "up"]);
        run(&["-n", &daemon_ns.name, "route", "add", "default", "via", "198.51.100.2"]);
        run(&["-n", &ns.name, "addr", "add", "198.51.100.2/24", "dev", &b]);
        run(&["-n", &ns.name, "link", "set", &b, "up"]);
        // A log line per request says which source address the outside saw.
        let log = dir.join("access.log");
        let server = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-m", "http.server", "8080", "--bind", "198.51.100.2"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_until("the outside web server", Duration::from_secs(10), || {
            String::from_utf8_lossy(&ns.exec(&["ss", "-ltn"]).stdout).contains("198.51.100.2:8080")
        });
        OutsideWorld { _ns: ns, server, log }
    }

    /// The web server's access log.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times the outside served its page.
    pub fn requests(&self) -> usize {
        self.server_log().lines().filter(|l| l.contains("GET /hello.txt")).count()
    }
}

impl Drop for OutsideWorld {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// The value of a cgroup file of `pid`'s cgroup for `controller` (`v1` or `v2` is the file's name in that
/// layout), read from the host's own mounts; the cgroup must be one banger made.
pub fn cgroup_file(pid: u32, controller: &str, v1: &str, v2: &str) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1_path = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
    });
    let (file, path) = match v1_path {
        Some(p) => {
            let mount = std::fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|m| m.file_name().unwrap().to_string_lossy().split(',').any(|c| c == controller))
                .unwrap_or_else(|| panic!("no v1 mount of {controller}"));
            (mount.join(p.trim_start_matches('/')).join(v1), p)
        }
        None => {
            let p = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_string();
            (std::path::Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')).join(v2), p)
        }
    };
    assert!(path.contains("/banger/"), "{controller} cgroup of {pid} is banger's: {path}");
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).trim().to_string()
}
