//! The request loop: demultiplexes frames by stream id and answers each request in its own task.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tools_schema::guest::{
    Frame, FrameKind, GuestErrorKind, GuestHealth, GuestRequest, GuestResponse, PROTOCOL_VERSION,
};
use tools_schema::BuildInfo;

use crate::channel::{self, respond, Incoming};
use crate::exec::{self, ExecInput};
use crate::session::Sessions;

pub fn run() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    // Sessions belong to the agent, not to a host connection: loaded once, shared by every connection.
    let sessions = Sessions::load(std::path::Path::new(crate::session::SESSIONS_DIR));
    if crate::init::boot_args().channel == tools_schema::boot::ChannelKind::Vsock {
        return serve_vsock(sessions).await;
    }
    let port = loop {
        // The port appears once virtio_console has probed; that is normally before we get here.
        if let Some(p) = channel::find_port() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (out, incoming) = channel::open(port)?;
    serve_connection(out, incoming, true, sessions).await;
    Ok(())
}

/// vsock (Firecracker, or QEMU with vhost-user-vsock): every host connection is its own session.
async fn serve_vsock(sessions: Arc<Sessions>) -> anyhow::Result<()> {
    use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
    // Booted without an initramfs, the agent can start before the kernel has bound the virtio vsock device;
    // a listener made before the transport exists may never see a connection. Wait for the device (5 s at
    // most, then listen anyway).
    let mut bound = false;
    for _ in 0..250 {
        bound = std::fs::read_dir("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport")
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("virtio")))
            .unwrap_or(false);
        if bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, tools_schema::guest::VSOCK_PORT))?;
    // On the console, so a guest the host cannot reach shows how far it got.
    eprintln!(
        "banger-agent: listening on vsock port {}{}",
        tools_schema::guest::VSOCK_PORT,
        if bound { "" } else { " (the virtio vsock device is not bound yet)" }
    );
    // Tell the host it may connect now. Only a QEMU host waits for this; elsewhere (Firecracker, a restarted
    // agent) nothing listens and the refusal means nothing.
    tokio::spawn(async {
        let host = VsockAddr::new(tokio_vsock::VMADDR_CID_HOST, tools_schema::guest::VSOCK_READY_PORT);
        let _ = tokio::time::timeout(Duration::from_secs(5), tokio_vsock::VsockStream::connect(host)).await;
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (rd, wr) = stream.into_split();
                let (out, incoming) = channel::from_stream(rd, wr);
                tokio::spawn(serve_connection(out, incoming, false, sessions.clone()));
            }
            Err(e) => {
                eprintln!("banger-agent: vsock accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers the frames of one host connection. A `persistent` channel (the virtio-serial port) outlives
/// its host connections; a vsock connection ends with its host.
async fn serve_connection(
    out: mpsc::UnboundedSender<Frame>,
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
    persistent: bool,
    sessions: Arc<Sessions>,
) {
    // Inputs of running exec streams, by stream id.
    let mut inputs: HashMap<u32, mpsc::UnboundedSender<ExecInput>> = HashMap::new();
    while let Some(ev) = incoming.recv().await {
        let frame = match ev {
            Incoming::Frame(f) => f,
            Incoming::HostGone => {
                // Nobody is left to read their output: end what the old connection started.
                for (_, tx) in inputs.drain() {
                    let _ = tx.send(ExecInput::Cancel);
                }
                if persistent {
                    continue;
                }
                return;
            }
        };
        inputs.retain(|_, tx| !tx.is_closed());
        match frame.kind {
            FrameKind::Request => {
                let stream = frame.stream;
                let request: GuestRequest = match frame.parse() {
                    Ok(r) => r,
                    Err(e) => {
                        let reply = GuestResponse::error(GuestErrorKind::Invalid, format!("malformed request: {e}"));
                        respond(&out, stream, reply);
                        continue;
                    }
                };
                match request {
                    GuestRequest::Hello { protocol } => {
                        let reply = if protocol == PROTOCOL_VERSION {
                            GuestResponse::Hello { protocol: PROTOCOL_VERSION, agent: BuildInfo::current() }
                        } else {
                            GuestResponse::error(
                                GuestErrorKind::Other,
                                format!("guest agent speaks protocol {PROTOCOL_VERSION}, host sent {protocol}"),
                            )
                        };
                        respond(&out, stream, reply);
                    }
                    GuestRequest::Health => respond(&out, stream, GuestResponse::Health(health())),
                    GuestRequest::Echo { data } => respond(&out, stream, GuestResponse::Echo { data }),
                    GuestRequest::Exec(spec) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        inputs.insert(stream, tx);
                        tokio::spawn(exec::run(stream, spec, rx, out.clone()));
                    }
                    GuestRequest::Stats => respond(&out, stream, GuestResponse::Stats(stats())),
                    GuestRequest::WriteFile { path, mode, append, make_dirs } => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        inputs.insert(stream, tx);
                        tokio::spawn(crate::files::write(stream, path, mode, append, make_dirs, rx, out.clone()));
                    }
                    GuestRequest::ReadFile { path, offset, limit } => {
                        let out = out.clone();
                        tokio::task::spawn_blocking(move || crate::files::read(stream, &path, offset, limit, &out));
                    }
                    GuestRequest::SshHostKey { wait_ms } => {
                        let out = out.clone();
                        let wait = Duration::from_millis(wait_ms.min(tools_schema::guest::SSH_HOST_KEY_WAIT_MAX_MS));
                        tokio::task::spawn_blocking(move || {
                            let reply = match crate::identity::ssh_host_public_key(wait) {
                                Ok(public_key) => GuestResponse::SshHostKey { public_key },
                                Err(message) => GuestResponse::error(GuestErrorKind::Other, message),
                            };
                            respond(&out, stream, reply);
                        });
                    }
                    GuestRequest::Ports => {
                        respond(&out, stream, GuestResponse::Ports { listeners: crate::ports::listeners() })
                    }
                    GuestRequest::SessionStart(spec) => {
                        let reply = match sessions.start(spec) {
                            Ok(status) => GuestResponse::SessionStatus(status),
                            Err(failure) => failure.into(),
                        };
                        respond(&out, stream, reply);
                    }
                    GuestRequest::SessionSend { id, eof } => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        inputs.insert(stream, tx);
                        tokio::spawn(session_send(sessions.clone(), stream, id, eof, rx, out.clone()));
                    }
                    GuestRequest::SessionRead { id, offset, limit, wait_ms } => {
                        let (sessions, out) = (sessions.clone(), out.clone());
                        tokio::spawn(async move {
                            let reply = match sessions.read(&id, offset, limit, wait_ms, stream, &out).await {
                                Ok(status) => GuestResponse::SessionData { from: offset, status },
                                Err(failure) => failure.into(),
                            };
                            respond(&out, stream, reply);
                        });
                    }
                    GuestRequest::SessionList => {
                        respond(&out, stream, GuestResponse::Sessions { sessions: sessions.list() })
                    }
                    GuestRequest::SessionSignal { id, signal, grace_ms } => {
                        let (sessions, out) = (sessions.clone(), out.clone());
                        tokio::spawn(async move {
                            let reply = match sessions.signal(&id, signal, grace_ms).await {
                                Ok(status) => GuestResponse::SessionStatus(status),
                                Err(failure) => failure.into(),
                            };
                            respond(&out, stream, reply);
                        });
                    }
                    GuestRequest::Reidentify(identity) => {
                        let out = out.clone();
                        tokio::task::spawn_blocking(move || {
                            let reply = match crate::identity::reidentify(&identity) {
                                Ok(()) => GuestResponse::Ok,
                                Err(e) => GuestResponse::error(GuestErrorKind::Other, format!("reidentify: {e:#}")),
                            };
                            respond(&out, stream, reply);
                        });
                    }
                    GuestRequest::Shutdown { reboot } => {
                        respond(&out, stream, GuestResponse::Ok);
                        tokio::spawn(power_off(reboot));
                    }
                }
            }
            FrameKind::Stdin | FrameKind::StdinEof | FrameKind::Cancel => {
                if let Some(tx) = inputs.get(&frame.stream) {
                    let input = match frame.kind {
                        FrameKind::Stdin => ExecInput::Data(frame.payload),
                        FrameKind::StdinEof => ExecInput::Eof,
                        _ => ExecInput::Cancel,
                    };
                    let _ = tx.send(input);
                }
            }
            FrameKind::Response | FrameKind::Stdout | FrameKind::Stderr => {
                eprintln!("banger-agent: ignoring a guest-bound {:?} frame", frame.kind);
            }
        }
    }
}

/// Collects a whole message from the Stdin frames, then writes it in one go. A host that goes away
/// mid-message (Cancel) writes nothing, so a session never sees half a message.
async fn session_send(
    sessions: Arc<Sessions>,
    stream: u32,
    id: String,
    eof: bool,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    out: mpsc::UnboundedSender<Frame>,
) {
    let mut message = vec![];
    let reply = loop {
        match input.recv().await {
            Some(ExecInput::Data(d)) => message.extend_from_slice(&d),
            Some(ExecInput::Eof) => {
                break match sessions.send(&id, message, eof).await {
                    Ok((bytes, stdin_open)) => GuestResponse::SessionSent { bytes, stdin_open },
                    Err(failure) => failure.into(),
                }
            }
            Some(ExecInput::Cancel) | None => {
                break GuestResponse::error(GuestErrorKind::Other, "send cancelled by the host; nothing was written")
            }
        }
    };
    respond(&out, stream, reply);
}

fn health() -> GuestHealth {
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0);
    let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    GuestHealth { agent: BuildInfo::current(), uptime_ms, hostname }
}

fn stats() -> tools_schema::vm::GuestStats {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let first_f64 = |s: String| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let meminfo = read("/proc/meminfo");
    let mem_kib = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (root_total, root_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(st) => {
            let frag = st.fragment_size();
            (st.blocks() * frag, (st.blocks() - st.blocks_free()) * frag)
        }
        Err(_) => (0, 0),
    };
    let processes = std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit())).count())
        .unwrap_or(0) as u32;
    tools_schema::vm::GuestStats {
        uptime_secs: first_f64(read("/proc/uptime")),
        load1: first_f64(read("/proc/loadavg")),
        mem_total_bytes: mem_kib("MemTotal:"),
        mem_available_bytes: mem_kib("MemAvailable:"),
        root_total_bytes: root_total,
        root_used_bytes: root_used,
        processes,
    }
}

/// Ends every process, flushes the disks and powers off, after the `Ok` reply has had time to leave.
async fn power_off(reboot: bool) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL);
    nix::unistd::sync();
    let _ = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    // Firecracker has no ACPI power-off: a guest "reboot" (reboot=k) is how its VMM exits. QEMU runs with
    // -no-reboot, so both paths end the VMM there.
    let firecracker = crate::init::boot_args().vmm == Some(tools_schema::daemon::VmmKind::Firecracker);
    let how = if reboot || firecracker {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let _ = nix::sys::reboot::reboot(how);
}
