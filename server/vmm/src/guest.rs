//! The daemon's end of the guest channel: one multiplexed connection per running VM.
//!
//! The VMM exposes the guest's channel as a Unix socket (a QEMU virtio-serial chardev). One reader task
//! routes incoming frames to the stream that owns them; writes go through one writer task, so frames of
//! concurrent requests never interleave.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;
use tools_schema::guest::{
    ExecSpec, ExitStatus, Frame, FrameDecoder, FrameKind, GuestErrorKind, GuestHealth, GuestRequest, GuestResponse,
    MAX_PAYLOAD, PROTOCOL_VERSION,
};
use tools_schema::BuildInfo;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot connect to the guest channel")]
    Connect(#[source] std::io::Error),
    #[error("the guest channel closed")]
    Closed,
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error. Made only by `GuestError::agent`, which caps and escapes the
    /// message; callers decide by `kind`, never by the text.
    #[error("the guest agent reported: {message}")]
    Agent { kind: GuestErrorKind, message: String },
    /// Made only by `GuestError::protocol`, which caps and escapes the detail (it quotes the guest).
    #[error("the guest agent sent an unexpected reply: {0}")]
    Protocol(String),
    #[error("cancelled")]
    Cancelled,
}

/// Most characters of guest text an error carries (a response frame can be 1 MiB).
pub const MAX_GUEST_MESSAGE_CHARS: usize = 512;

impl GuestError {
    /// An agent's error answer, with its untrusted message made safe (`untrusted_text`).
    pub fn agent(kind: GuestErrorKind, message: &str) -> Self {
        GuestError::Agent { kind, message: untrusted_text(message) }
    }
    /// A reply that breaks the protocol; `detail` may quote the guest, so it is made safe too.
    pub fn protocol(detail: impl AsRef<str>) -> Self {
        GuestError::Protocol(untrusted_text(detail.as_ref()))
    }
    /// The agent's kind, when the agent answered with an error.
    pub fn agent_kind(&self) -> Option<GuestErrorKind> {
        match self {
            GuestError::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Guest text fit to reach a user: about `MAX_GUEST_MESSAGE_CHARS` characters at most, escapes included (a cut
/// is marked with the whole length), with C0/C1
/// controls, DEL and the bidi embedding, override and isolate marks written as `\xNN` / `\u{NNNN}`, so it
/// can move no cursor, colour no terminal and make no name read as another, wherever it is printed or logged.
pub fn untrusted_text(text: &str) -> String {
    use std::fmt::Write as _;
    let unsafe_char = |c: char| {
        matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}')
    };
    let mut out = String::with_capacity(text.len().min(MAX_GUEST_MESSAGE_CHARS * 4));
    let mut shown = 0; // characters in `out` (escapes are ASCII, so their bytes)
    for c in text.chars() {
        if shown >= MAX_GUEST_MESSAGE_CHARS {
            let _ = write!(out, "... ({} bytes in all)", text.len());
            break;
        }
        if !unsafe_char(c) {
            out.push(c);
            shown += 1;
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
            shown += 4;
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            shown += 8;
        }
    }
    out
}

/// Frames queued per stream before the channel's reader waits for that stream's consumer: the memory a guest
/// can make the daemon hold per stream is bounded (`STREAM_QUEUE` x `MAX_PAYLOAD`), whatever it sends.
const STREAM_QUEUE: usize = 8;
/// Fixed allowance of every call on top of its data transfer time (an emulated guest under load is slow).
const CALL_BASE: Duration = Duration::from_secs(30);
/// Transfer allowance per MiB moved, for calls whose deadline scales with their size.
const CALL_PER_MIB: Duration = Duration::from_secs(1);
/// How long a cancelled command may take to report its end before the host stops waiting for it.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The deadline of a call moving `bytes` through the channel.
pub fn transfer_deadline(bytes: u64) -> Duration {
    CALL_BASE + CALL_PER_MIB * (bytes.div_ceil(1 << 20) as u32)
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

pub struct GuestConn {
    out: mpsc::UnboundedSender<Frame>,
    routes: Routes,
    next_stream: AtomicU32,
    closed: CancellationToken,
}

/// Output and status of a finished guest command.
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// One open stream: its frames, and the route removed from the reader when the call ends, however it ends.
struct Stream<'a> {
    id: u32,
    rx: mpsc::Receiver<Frame>,
    conn: &'a GuestConn,
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.conn.routes.lock().remove(&self.id);
    }
}

impl Stream<'_> {
    /// The next frame of this stream, or why there is none: the deadline passed, the caller cancelled, or the
    /// channel closed (a killed VM closes it at once, so no call outlives its VM).
    async fn next(
        &mut self,
        deadline: tokio::time::Instant,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<Frame, GuestError> {
        tokio::select! {
            f = self.rx.recv() => f.ok_or(GuestError::Closed),
            _ = tokio::time::sleep_until(deadline) => Err(GuestError::Timeout(limit)),
            _ = cancel.cancelled() => Err(GuestError::Cancelled),
            _ = self.conn.closed.cancelled() => Err(GuestError::Closed),
        }
    }

    /// Waits for the stream's response, passing data frames to `on_data`, which may refuse them (a byte cap).
    async fn response(
        &mut self,
        limit: Duration,
        cancel: &CancellationToken,
        mut on_data: impl FnMut(&Frame) -> Result<(), GuestError>,
    ) -> Result<GuestResponse, GuestError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let f = self.next(deadline, limit, cancel).await?;
            match f.kind {
                FrameKind::Response => {
                    return match f.parse::<GuestResponse>().map_err(|e| GuestError::protocol(e.to_string()))? {
                        GuestResponse::Error { kind, message } => Err(GuestError::agent(kind, &message)),
                        r => Ok(r),
                    }
                }
                FrameKind::Stdout | FrameKind::Stderr => on_data(&f)?,
                _ => {}
            }
        }
    }
}

/// A byte cap on what one call accepts from the guest.
fn over_cap(what: &str, cap: u64) -> GuestError {
    GuestError::protocol(format!("the guest sent more {what} than the {cap} bytes asked for"))
}

impl GuestConn {
    /// Connects to a virtio-serial channel socket. This does not wait for the guest: see `wait_ready`.
    pub async fn connect(path: &Path) -> Result<Arc<GuestConn>, GuestError> {
        let stream = crate::host::connect_vm_socket(path).await.map_err(GuestError::Connect)?;
        Ok(Self::from_stream(stream))
    }

    /// Connects to the guest agent's vsock port through a hybrid vsock Unix socket (Firecracker's, or
    /// vhost-device-vsock's for QEMU). Fails while the guest is not listening yet; callers retry.
    pub async fn connect_vsock(uds: &Path, port: u32) -> Result<Arc<GuestConn>, GuestError> {
        let stream = crate::hybrid_vsock::connect(uds, port).await.map_err(GuestError::Connect)?;
        Ok(Self::from_stream(stream))
    }

    fn from_stream(stream: UnixStream) -> Arc<GuestConn> {
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
        let routes: Routes = Arc::default();
        let closed = CancellationToken::new();
        let conn =
            Arc::new(GuestConn { out, routes: routes.clone(), next_stream: AtomicU32::new(1), closed: closed.clone() });
        let closed_w = closed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    f = out_rx.recv() => match f {
                        Some(f) => if wr.write_all(&f.encode()).await.is_err() { break },
                        None => break,
                    },
                    _ = closed_w.cancelled() => break,
                }
            }
            closed_w.cancel();
        });
        tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            // Whatever a guest sends, it cannot make the daemon write more than a few lines a minute about it.
            let mut complaints = RateLimited::new("guest channel decode", 5, Duration::from_secs(60));
            loop {
                let n = tokio::select! {
                    r = rd.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                    _ = closed.cancelled() => break,
                };
                dec.push(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(frame)) => {
                            let tx = routes.lock().get(&frame.stream).cloned();
                            let (done, stream) = (frame.kind == FrameKind::Response, frame.stream);
                            if let Some(tx) = tx {
                                // Waits while the stream's consumer is behind (its queue is bounded); a closed
                                // channel wakes it. A consumer that went away drops the frame.
                                tokio::select! {
                                    _ = tx.send(frame) => {}
                                    _ = closed.cancelled() => break,
                                }
                            }
                            if done {
                                routes.lock().remove(&stream);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => complaints.warn(&e.to_string()),
                    }
                }
                if closed.is_cancelled() {
                    break;
                }
            }
            closed.cancel();
            // Wake every waiter: their streams can no longer complete.
            routes.lock().clear();
        });
        conn
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the channel: every call waiting on it returns `Closed` at once.
    pub fn close(&self) {
        self.closed.cancel();
    }

    fn open_stream(&self) -> Stream<'_> {
        // Host-opened streams are odd, leaving even ids for guest-opened streams in a later protocol.
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        self.routes.lock().insert(id, tx);
        Stream { id, rx, conn: self }
    }

    fn send(&self, frame: Frame) -> Result<(), GuestError> {
        self.out.send(frame).map_err(|_| GuestError::Closed)
    }

    /// Sends a request and waits up to `timeout` for its single response (data frames are ignored; the
    /// response itself is at most one frame, `MAX_PAYLOAD` bytes). An `Error` answer is
    /// `Err(GuestError::Agent)`, its message already made safe: callers decide what its kind means.
    pub async fn request(
        &self,
        req: &GuestRequest,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<GuestResponse, GuestError> {
        let mut stream = self.open_stream();
        self.send(Frame::json(FrameKind::Request, stream.id, req))?;
        stream.response(timeout, cancel, |_| Ok(())).await
    }

    /// Repeats `Hello` until the agent answers (the guest may still be booting), then checks the protocol.
    pub async fn wait_ready(
        &self,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Result<BuildInfo, GuestError> {
        loop {
            if self.is_closed() {
                return Err(GuestError::Closed);
            }
            let hello = GuestRequest::Hello { protocol: PROTOCOL_VERSION };
            match self.request(&hello, Duration::from_millis(500), cancel).await {
                Ok(GuestResponse::Hello { protocol, agent }) if protocol == PROTOCOL_VERSION => return Ok(agent),
                Ok(other) => return Err(GuestError::protocol(format!("{other:?}"))),
                Err(GuestError::Timeout(_)) if tokio::time::Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One round trip through the channel and the agent's request loop, nothing else (`banger bench`).
    pub async fn echo(&self, data: &str) -> Result<(), GuestError> {
        let req = GuestRequest::Echo { data: data.to_string() };
        match self.request(&req, Duration::from_secs(5), &CancellationToken::new()).await? {
            GuestResponse::Echo { data: back } if back == data => Ok(()),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }

    pub async fn health(&self, cancel: &CancellationToken) -> Result<GuestHealth, GuestError> {
        match self.request(&GuestRequest::Health, Duration::from_secs(5), cancel).await? {
            GuestResponse::Health(h) => Ok(h),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }

    /// Runs a command to completion, keeping at most `limit` bytes of each output stream.
    pub async fn exec(
        &self,
        spec: ExecSpec,
        stdin: Option<Vec<u8>>,
        limit: usize,
        cancel: &CancellationToken,
    ) -> Result<ExecOutput, GuestError> {
        let (mut out, mut err) = (Capture::new(limit, None), Capture::new(limit, None));
        let status = self.exec_captured(spec, stdin, &mut out, &mut err, cancel).await?;
        Ok(ExecOutput {
            status,
            stdout_truncated: out.truncated(),
            stderr_truncated: err.truncated(),
            stdout: out.inline,
            stderr: err.inline,
        })
    }

    /// Runs a command to completion, passing its output to the two captures (which bound what is kept).
    /// The guest kills the command after `spec.timeout_ms` (default `DEFAULT_EXEC_TIMEOUT`); the host stops
    /// waiting a little after that, and a cancelled command gets `CANCEL_GRACE` to report its end.
    pub async fn exec_captured(
        &self,
        spec: ExecSpec,
        stdin: Option<Vec<u8>>,
        stdout: &mut Capture,
        stderr: &mut Capture,
        cancel: &CancellationToken,
    ) -> Result<ExitStatus, GuestError> {
        let guest_timeout = Duration::from_millis(spec.timeout_ms.unwrap_or(DEFAULT_EXEC_TIMEOUT.as_millis() as u64));
        let limit = guest_timeout + transfer_deadline(stdin.as_ref().map_or(0, |d| d.len() as u64));
        let mut deadline = tokio::time::Instant::now() + limit;
        let mut stream = self.open_stream();
        let id = stream.id;
        let has_stdin = stdin.is_some();
        let spec = ExecSpec { stdin: has_stdin, timeout_ms: Some(guest_timeout.as_millis() as u64), ..spec };
        self.send(Frame::json(FrameKind::Request, id, &GuestRequest::Exec(spec)))?;
        if let Some(data) = stdin {
            for chunk in data.chunks(MAX_PAYLOAD) {
                self.send(Frame::new(FrameKind::Stdin, id, chunk.to_vec()))?;
            }
            self.send(Frame::new(FrameKind::StdinEof, id, vec![]))?;
        }
        let never = CancellationToken::new();
        let mut cancelled = false;
        loop {
            let frame = match stream.next(deadline, limit, if cancelled { &never } else { cancel }).await {
                Ok(f) => f,
                Err(GuestError::Cancelled) => {
                    // Ask the guest to kill the command; its final response still arrives, unless the guest
                    // does not answer within the grace period.
                    cancelled = true;
                    deadline = deadline.min(tokio::time::Instant::now() + CANCEL_GRACE);
                    let _ = self.send(Frame::new(FrameKind::Cancel, id, vec![]));
                    continue;
                }
                Err(GuestError::Timeout(_)) if cancelled => return Err(GuestError::Cancelled),
                Err(e) => return Err(e),
            };
            match frame.kind {
                FrameKind::Stdout => stdout.push(&frame.payload),
                FrameKind::Stderr => stderr.push(&frame.payload),
                FrameKind::Response => {
                    return match frame.parse::<GuestResponse>().map_err(|e| GuestError::protocol(e.to_string()))? {
                        _ if cancelled => Err(GuestError::Cancelled),
                        GuestResponse::Exited(st) => Ok(st),
                        GuestResponse::Error { kind, message } => Err(GuestError::agent(kind, &message)),
                        other => Err(GuestError::protocol(format!("{other:?}"))),
                    };
                }
                _ => {}
            }
        }
    }
}

/// The guest's own timeout for a command that names none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

impl GuestConn {
    /// Writes `data` to a file in the guest; returns the file's size afterwards.
    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        append: bool,
        data: &[u8],
        cancel: &CancellationToken,
    ) -> Result<u64, GuestError> {
        let mut stream = self.open_stream();
        let req = GuestRequest::WriteFile { path: path.to_string(), mode, append, make_dirs: true };
        self.send(Frame::json(FrameKind::Request, stream.id, &req))?;
        for chunk in data.chunks(MAX_PAYLOAD) {
            self.send(Frame::new(FrameKind::Stdin, stream.id, chunk.to_vec()))?;
        }
        self.send(Frame::new(FrameKind::StdinEof, stream.id, vec![]))?;
        match stream.response(transfer_deadline(data.len() as u64), cancel, |_| Ok(())).await? {
            GuestResponse::Written { size, .. } => Ok(size),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }

    /// Reads up to `limit` bytes at `offset`; returns them with the file's size and mode as the guest
    /// reports them (untrusted: the caller checks both). A guest that sends more than `limit` bytes is cut
    /// off with an error, so the daemon never holds more than it asked for.
    pub async fn read_file(
        &self,
        path: &str,
        offset: u64,
        limit: u64,
        cancel: &CancellationToken,
    ) -> Result<(Vec<u8>, u64, u32), GuestError> {
        let mut stream = self.open_stream();
        let req = GuestRequest::ReadFile { path: path.to_string(), offset, limit };
        self.send(Frame::json(FrameKind::Request, stream.id, &req))?;
        let mut data = vec![];
        let res = stream
            .response(transfer_deadline(limit), cancel, |f| {
                if f.kind != FrameKind::Stdout || (data.len() + f.payload.len()) as u64 > limit {
                    return Err(over_cap("file data", limit));
                }
                data.extend_from_slice(&f.payload);
                Ok(())
            })
            .await?;
        match res {
            GuestResponse::FileData { size, mode } => Ok((data, size, mode)),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }
}
/// One output stream of a command: its first `limit` bytes in memory and, when a spool path is given, the
/// whole stream in that file, made only once the stream outgrows the limit (so most commands never touch
/// the disk). A spool that cannot be written, or that reaches `MAX_SPOOL` bytes, stops there and the stream
/// is reported as cut.
pub struct Capture {
    pub inline: Vec<u8>,
    limit: usize,
    spool_path: Option<PathBuf>,
    spool: Option<std::fs::File>,
    spooled: u64,
    /// Every byte the command wrote to this stream.
    pub total: u64,
    spool_failed: bool,
    /// Bytes the VM's spool folder may still take (shared by every command of the VM); `None`: no cap
    /// beyond `MAX_SPOOL`.
    budget: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Largest spooled stream: output beyond it is dropped and the stream reported as cut.
pub const MAX_SPOOL: u64 = 1 << 30;

impl Capture {
    pub fn new(limit: usize, spool_path: Option<PathBuf>) -> Capture {
        Capture {
            inline: vec![],
            limit,
            spool_path,
            spool: None,
            spooled: 0,
            total: 0,
            spool_failed: false,
            budget: None,
        }
    }

    /// Draws spooled bytes from `budget`; when it runs out the spool stops and the stream is reported cut.
    pub fn with_budget(mut self, budget: Arc<std::sync::atomic::AtomicU64>) -> Capture {
        self.budget = Some(budget);
        self
    }

    /// Takes up to `want` bytes from the budget.
    fn reserve(&self, want: u64) -> u64 {
        let Some(budget) = &self.budget else { return want };
        let mut got = 0;
        let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            got = left.min(want);
            Some(left - got)
        });
        got
    }

    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.limit.saturating_sub(self.inline.len());
        if self.spool.is_none() && data.len() > room && !self.spool_failed {
            if let Some(path) = &self.spool_path {
                // The folder is made here, on first use, so commands whose output fits inline touch no disk.
                let opened = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|_| std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path));
                match opened.and_then(|mut f| f.write_all(&self.inline).map(|_| f)) {
                    Ok(f) => {
                        self.spooled = self.inline.len() as u64;
                        self.spool = Some(f);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot spool command output");
                        self.spool_failed = true;
                    }
                }
            }
        }
        if self.spool.is_some() {
            let take = self.reserve(data.len().min((MAX_SPOOL - self.spooled) as usize) as u64) as usize;
            let f = self.spool.as_mut().expect("checked above");
            if f.write_all(&data[..take]).is_err() {
                self.spool = None;
                self.spool_failed = true;
            }
            self.spooled += take as u64;
        }
        self.inline.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// More was written than came back inline.
    pub fn truncated(&self) -> bool {
        self.total > self.inline.len() as u64
    }

    /// The whole stream is in the spool file.
    pub fn spooled_whole(&self) -> bool {
        self.spooled > 0 && self.spooled == self.total
    }
}

/// Output of a session log read: `(stream, bytes)` runs in log order, starting at `from`.
pub struct SessionRead {
    pub from: u64,
    pub runs: Vec<(FrameKind, Vec<u8>)>,
    pub status: tools_schema::session::GuestSessionStatus,
}

impl GuestConn {
    /// Sends one message to a session's stdin; the agent writes it whole. Returns (bytes, stdin still open).
    pub async fn session_send(
        &self,
        id: &str,
        data: &[u8],
        eof: bool,
        cancel: &CancellationToken,
    ) -> Result<(u64, bool), GuestError> {
        let mut stream = self.open_stream();
        let req = GuestRequest::SessionSend { id: id.to_string(), eof };
        self.send(Frame::json(FrameKind::Request, stream.id, &req))?;
        for chunk in data.chunks(MAX_PAYLOAD) {
            self.send(Frame::new(FrameKind::Stdin, stream.id, chunk.to_vec()))?;
        }
        self.send(Frame::new(FrameKind::StdinEof, stream.id, vec![]))?;
        match stream.response(transfer_deadline(data.len() as u64), cancel, |_| Ok(())).await? {
            GuestResponse::SessionSent { bytes, stdin_open } => Ok((bytes, stdin_open)),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }

    /// Reads up to `limit` bytes of a session's log from `offset`, the agent waiting up to `wait_ms` for
    /// output first. More than `limit` bytes is refused, as in `read_file`.
    pub async fn session_read(
        &self,
        id: &str,
        offset: u64,
        limit: u64,
        wait_ms: u64,
        cancel: &CancellationToken,
    ) -> Result<SessionRead, GuestError> {
        let mut stream = self.open_stream();
        let req = GuestRequest::SessionRead { id: id.to_string(), offset, limit, wait_ms };
        self.send(Frame::json(FrameKind::Request, stream.id, &req))?;
        // The agent answers by wait_ms; beyond that (plus transfer time) it is not answering at all.
        let deadline = Duration::from_millis(wait_ms) + transfer_deadline(limit);
        let mut runs: Vec<(FrameKind, Vec<u8>)> = vec![];
        let mut got = 0u64;
        let res = stream
            .response(deadline, cancel, |f| {
                got += f.payload.len() as u64;
                if got > limit {
                    return Err(over_cap("session output", limit));
                }
                match runs.last_mut() {
                    Some((kind, data)) if *kind == f.kind => data.extend_from_slice(&f.payload),
                    _ => runs.push((f.kind, f.payload.clone())),
                }
                Ok(())
            })
            .await?;
        match res {
            GuestResponse::SessionData { from, status } => Ok(SessionRead { from, runs, status }),
            other => Err(GuestError::protocol(format!("{other:?}"))),
        }
    }
}

/// A log line that a guest (or any peer) can trigger at will: at most `burst` lines per `window`, then one
/// line saying how many were suppressed when the window ends. The one place rate-limited logging lives.
pub struct RateLimited {
    what: &'static str,
    burst: u32,
    window: Duration,
    started: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(what: &'static str, burst: u32, window: Duration) -> Self {
        RateLimited { what, burst, window, started: std::time::Instant::now(), logged: 0, suppressed: 0 }
    }

    /// Logs `detail` at WARN unless this window's burst is spent. Details are cut to 200 characters.
    pub fn warn(&mut self, detail: &str) {
        if self.started.elapsed() >= self.window {
            if self.suppressed > 0 {
                tracing::warn!(what = self.what, suppressed = self.suppressed, "similar warnings suppressed");
            }
            self.started = std::time::Instant::now();
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            let detail: String = detail.chars().take(200).collect();
            tracing::warn!(what = self.what, detail, "peer misbehaved");
        } else {
            self.suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_capped_and_its_controls_escaped() {
        let hostile = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}evil\r\n".repeat(100_000);
        let safe = untrusted_text(&hostile);
        assert!(safe.chars().count() <= MAX_GUEST_MESSAGE_CHARS + 40, "{} chars", safe.chars().count());
        assert!(!safe.chars().any(|c| c.is_control() || c == '\u{202e}'), "{safe}");
        assert!(safe.starts_with("\\x1b[2J\\x1b]0;pwned\\x07\\u{202e}evil\\x0d\\x0a"), "{safe}");
        assert!(safe.ends_with(&format!("... ({} bytes in all)", hostile.len())), "{safe}");
        // Ordinary text, non-ASCII included, passes untouched.
        assert_eq!(untrusted_text("cannot read /tmp/ä: No such file"), "cannot read /tmp/ä: No such file");
        let agent = GuestError::agent(GuestErrorKind::NotFound, &hostile);
        assert_eq!(agent.agent_kind(), Some(GuestErrorKind::NotFound));
        assert!(!agent.to_string().chars().any(|c| c.is_control()));
        assert!(!GuestError::protocol(&hostile).to_string().chars().any(|c| c.is_control()));
    }
}
