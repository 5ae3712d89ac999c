//! banger-fake-agent: a hostile guest agent for the attack tests (`tests/tests/attack_guest_channel.rs`).
//!
//! The guest is root, so it can always replace banger's agent; this binary models that. The harness
//! (`TestDaemon::install_fake_agent`) copies it into a running guest, bind-mounts it over
//! `/usr/local/bin/banger-agent` and kills the real server, so PID 1 restarts *this* binary as the server
//! on the same virtio-serial port. It speaks the guest protocol well enough to be driven (Hello, Health,
//! Echo, Exec, WriteFile, ReadFile, Shutdown) and misbehaves on command: `/run/banger-fake-agent.json`
//! maps a request's `op` (`read_file`, `write_file`, `exec`, ...) to a behaviour, read afresh for every
//! request, so a test switches behaviours with an ordinary write:
//!
//! - `"silent"`: never answer.
//! - `"flood:N"`: send N data bytes (whatever was asked for), then answer as usual.
//! - `"claim:N"`: answer with a reported size of N (a ReadFile's `size`) over honest data.
//! - `"version_flood:N"`: first send N frames with a wrong protocol version.
//! - `"garbage:N"`: first send N bytes that are no frame at all.
//! - `"trickle:MS"`: write the answer one byte every MS milliseconds.
//! - `"bad_error:N"`: answer with an `Error` whose `kind` is no kind at all (a JSON object) and whose message
//!   is N bytes of terminal escapes, bidi overrides and newlines (its JSON is ~1.75 N: keep N under 600000,
//!   or the frame is over the 1 MiB a frame may carry and the host skips it as garbage).
//!
//! Commands it runs see `BANGER_FAKE_AGENT=1`, which is how the harness knows it took over.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tools_schema::guest::{
    ExitStatus, Frame, FrameDecoder, FrameKind, GuestErrorKind, GuestHealth, GuestRequest, GuestResponse,
    PROTOCOL_VERSION, VIRTIO_PORT_NAME,
};
use tools_schema::BuildInfo;

const CONFIG: &str = "/run/banger-fake-agent.json";

type Out = Arc<Mutex<File>>;
type Inputs = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("dns-flood") {
        return dns_flood(&args[2], args[3].parse().unwrap(), args[4].parse().unwrap());
    }
    let port = find_port().expect("the banger virtio-serial port");
    let file = OpenOptions::new().read(true).write(true).open(&port).expect("opening the port");
    let out: Out = Arc::new(Mutex::new(file.try_clone().expect("dup port")));
    let inputs: Inputs = Arc::default();
    let mut reader = file;
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Ok(Some(frame)) = dec.next_frame() {
            match frame.kind {
                FrameKind::Request => {
                    let (tx, rx) = mpsc::channel();
                    inputs.lock().unwrap().insert(frame.stream, tx);
                    let (out, inputs) = (out.clone(), inputs.clone());
                    std::thread::spawn(move || {
                        let stream = frame.stream;
                        if let Ok(req) = frame.parse::<GuestRequest>() {
                            handle(&out, stream, req, rx);
                        }
                        inputs.lock().unwrap().remove(&stream);
                    });
                }
                _ => {
                    if let Some(tx) = inputs.lock().unwrap().get(&frame.stream) {
                        let _ = tx.send(frame);
                    }
                }
            }
        }
    }
}

/// `banger-fake-agent dns-flood SERVER UDP_QUERIES TCP_CONNECTIONS`: the guest-side tool of the DNS attack.
/// Sends UDP queries as fast as it can, then opens TCP connections and holds them; prints how many of those
/// the server left open after a second, then keeps them until killed.
fn dns_flood(server: &str, udp_queries: u32, tcp_connections: u32) {
    use std::net::{TcpStream, UdpSocket};
    let addr = format!("{server}:53");
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    // A query for flood.vm (id 0x4242, RD, one question, type A, class IN).
    let mut q = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5];
    q.extend_from_slice(b"flood\x02vm\x00\x00\x01\x00\x01");
    for _ in 0..udp_queries {
        let _ = udp.send_to(&q, &addr);
    }
    let mut held = vec![];
    for _ in 0..tcp_connections {
        if let Ok(s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let open = held
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let mut r: &TcpStream = s;
            matches!(r.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    println!("{open}");
    std::thread::sleep(Duration::from_secs(u64::MAX / 4));
}

fn find_port() -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        if std::fs::read_to_string(e.path().join("name")).unwrap_or_default().trim() == VIRTIO_PORT_NAME {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

/// The configured behaviour for `op`, if any: (name, number).
fn behaviour(op: &str) -> Option<(String, u64)> {
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(CONFIG).ok()?).ok()?;
    let b = config.get(op)?.as_str()?.to_string();
    let (name, n) = b.split_once(':').unwrap_or((&b, "0"));
    Some((name.to_string(), n.parse().unwrap_or(0)))
}

fn write(out: &Out, bytes: &[u8]) {
    let _ = out.lock().unwrap().write_all(bytes);
}

fn send(out: &Out, frame: Frame) {
    write(out, &frame.encode());
}

fn op_name(req: &GuestRequest) -> String {
    serde_json::to_value(req).ok().and_then(|v| v["op"].as_str().map(str::to_string)).unwrap_or_default()
}

fn handle(out: &Out, stream: u32, req: GuestRequest, input: mpsc::Receiver<Frame>) {
    let how = behaviour(&op_name(&req));
    let (name, n) = how.clone().unwrap_or_default();
    match name.as_str() {
        "silent" => {
            // Keep the stream open (and its input drained) forever.
            while input.recv().is_ok() {}
            std::thread::sleep(Duration::from_secs(u64::MAX / 4));
            return;
        }
        "version_flood" => {
            let mut bad = Frame::new(FrameKind::Stdout, stream, vec![b'v'; 64]).encode();
            bad[2] = PROTOCOL_VERSION.wrapping_add(1);
            let mut burst = Vec::with_capacity(bad.len() * 1024);
            for i in 0..n {
                burst.extend_from_slice(&bad);
                if burst.len() >= bad.len() * 1024 || i + 1 == n {
                    write(out, &burst);
                    burst.clear();
                }
            }
        }
        "garbage" => {
            let junk: Vec<u8> =
                (0..n).map(|i| (i * 7 + 13) as u8 & 0x7f).map(|b| if b == b'B' { b'x' } else { b }).collect();
            for c in junk.chunks(1 << 16) {
                write(out, c);
            }
        }
        _ => {}
    }
    if name == "bad_error" {
        let piece = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}evil\r\n";
        let message: String = piece
            .chars()
            .cycle()
            .scan(0usize, |len, c| {
                *len += c.len_utf8();
                (*len <= n as usize).then_some(c)
            })
            .collect();
        let body = serde_json::json!({"result": "error", "kind": {"not_found": true}, "message": message});
        send(out, Frame::new(FrameKind::Response, stream, body.to_string().into_bytes()));
        return;
    }
    let flood = (name == "flood").then_some(n);
    let claim = (name == "claim").then_some(n);
    let response = answer(out, stream, req, &input, flood, claim);
    let frame = Frame::json(FrameKind::Response, stream, &response);
    if name == "trickle" {
        for b in frame.encode() {
            write(out, &[b]);
            std::thread::sleep(Duration::from_millis(n));
        }
    } else {
        send(out, frame);
    }
}

/// Sends `n` bytes of data frames on `stream`.
fn flood_data(out: &Out, stream: u32, n: u64) {
    let chunk = vec![b'z'; 1 << 20];
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        send(out, Frame::new(FrameKind::Stdout, stream, chunk[..take].to_vec()));
        left -= take as u64;
    }
}

fn collect_stdin(input: &mpsc::Receiver<Frame>) -> Vec<u8> {
    let mut data = vec![];
    while let Ok(f) = input.recv() {
        match f.kind {
            FrameKind::Stdin => data.extend_from_slice(&f.payload),
            FrameKind::StdinEof => break,
            _ => {}
        }
    }
    data
}

fn answer(
    out: &Out,
    stream: u32,
    req: GuestRequest,
    input: &mpsc::Receiver<Frame>,
    flood: Option<u64>,
    claim: Option<u64>,
) -> GuestResponse {
    let err = |message: String| GuestResponse::error(GuestErrorKind::Other, message);
    // File errors carry the kinds the real agent gives them, so the host maps them the same way.
    let io_err = |path: &str, e: std::io::Error| {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => GuestErrorKind::NotFound,
            _ => GuestErrorKind::Invalid,
        };
        GuestResponse::error(kind, format!("{path}: {e}"))
    };
    match req {
        GuestRequest::Hello { .. } => GuestResponse::Hello { protocol: PROTOCOL_VERSION, agent: BuildInfo::current() },
        GuestRequest::Health => GuestResponse::Health(GuestHealth {
            agent: BuildInfo::current(),
            uptime_ms: 0,
            hostname: "fake-agent".into(),
        }),
        GuestRequest::Echo { data } => GuestResponse::Echo { data },
        GuestRequest::Exec(spec) => {
            let started = Instant::now();
            if spec.stdin {
                collect_stdin(input);
            }
            let Some((prog, args)) = spec.argv.split_first() else { return err("empty argv".into()) };
            let mut cmd = std::process::Command::new(prog);
            cmd.args(args).envs(&spec.env).env("BANGER_FAKE_AGENT", "1").stdin(std::process::Stdio::null());
            if let Some(cwd) = &spec.cwd {
                cmd.current_dir(cwd);
            }
            match cmd.output() {
                Ok(o) => {
                    if let Some(n) = flood {
                        flood_data(out, stream, n);
                    }
                    for (kind, data) in [(FrameKind::Stdout, &o.stdout), (FrameKind::Stderr, &o.stderr)] {
                        for c in data.chunks(1 << 20) {
                            send(out, Frame::new(kind, stream, c.to_vec()));
                        }
                    }
                    use std::os::unix::process::ExitStatusExt;
                    GuestResponse::Exited(ExitStatus {
                        code: o.status.code(),
                        signal: o.status.signal(),
                        timed_out: false,
                        duration_ms: started.elapsed().as_millis() as u64,
                    })
                }
                Err(e) => err(format!("cannot run {prog}: {e}")),
            }
        }
        GuestRequest::WriteFile { path, mode, append, make_dirs } => {
            let data = collect_stdin(input);
            let p = std::path::Path::new(&path);
            if make_dirs {
                if let Some(parent) = p.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
            }
            use std::os::unix::fs::OpenOptionsExt;
            let opened = OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .mode(mode.unwrap_or(0o644))
                .open(p);
            match opened.and_then(|mut f| f.write_all(&data).and_then(|_| f.metadata())) {
                Ok(m) => GuestResponse::Written { bytes: data.len() as u64, size: m.len() },
                Err(e) => io_err(&path, e),
            }
        }
        GuestRequest::ReadFile { path, offset, limit } => {
            use std::io::{Seek, SeekFrom};
            use std::os::unix::fs::PermissionsExt;
            if let Some(n) = flood {
                flood_data(out, stream, n);
                return GuestResponse::FileData { size: n, mode: 0o644 };
            }
            let read = File::open(&path).and_then(|mut f| {
                let meta = f.metadata()?;
                f.seek(SeekFrom::Start(offset))?;
                let mut data = vec![];
                f.take(limit).read_to_end(&mut data)?;
                Ok((data, meta))
            });
            match read {
                Ok((data, meta)) => {
                    for c in data.chunks(1 << 20) {
                        send(out, Frame::new(FrameKind::Stdout, stream, c.to_vec()));
                    }
                    GuestResponse::FileData {
                        size: claim.unwrap_or(meta.len()),
                        mode: meta.permissions().mode() & 0o7777,
                    }
                }
                Err(e) => io_err(&path, e),
            }
        }
        GuestRequest::Shutdown { reboot } => {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                unsafe {
                    libc::sync();
                    libc::reboot(if reboot {
                        libc::LINUX_REBOOT_CMD_RESTART
                    } else {
                        libc::LINUX_REBOOT_CMD_POWER_OFF
                    });
                }
            });
            GuestResponse::Ok
        }
        other => err(format!("the fake agent does not implement {}", op_name(&other))),
    }
}
