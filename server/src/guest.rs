//! The daemon's end of the guest channel: one multiplexed connection per running VM.
//!
//! The VMM exposes the guest's channel as a Unix socket (a QEMU virtio-serial chardev). One reader task
//! routes incoming frames to the stream that owns them; writes go through one writer task, so frames of
//! concurrent requests never interleave.
use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tools_schema::guest::{
    ExecSpec, ExitStatus, Frame, FrameDecoder, FrameKind, GuestHealth, GuestRequest, GuestResponse, MAX_PAYLOAD,
    PROTOCOL_VERSION,
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
    #[error("the guest agent reported: {0}")]
    Agent(String),
    #[error("the guest agent sent an unexpected reply: {0}")]
    Protocol(String),
    #[error("cancelled")]
    Cancelled,
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>>;

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

impl GuestConn {
    /// Connects to a virtio-serial channel socket. This does not wait for the guest: see `wait_ready`.
    pub async fn connect(path: &Path) -> Result<Arc<GuestConn>, GuestError> {
        let stream = UnixStream::connect(path).await.map_err(GuestError::Connect)?;
        Ok(Self::from_stream(stream))
    }

    /// Connects to the guest agent's vsock port through a hybrid vsock Unix socket (Firecracker's, or
    /// vhost-device-vsock's for QEMU). Fails while the guest is not listening yet; callers retry.
    pub async fn connect_vsock(uds: &Path, port: u32) -> Result<Arc<GuestConn>, GuestError> {
        let stream = crate::vmm::firecracker::vsock_connect(uds, port).await.map_err(GuestError::Connect)?;
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
            loop {
                let n = tokio::select! {
                    r = rd.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                    _ = closed.cancelled() => break,
                };
                dec.push(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(frame)) => {
                            let mut routes = routes.lock().unwrap();
                            let done = frame.kind == FrameKind::Response;
                            let stream = frame.stream;
                            if let Some(tx) = routes.get(&stream) {
                                let _ = tx.send(frame);
                            }
                            if done {
                                routes.remove(&stream);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => tracing::warn!(error = %e, "guest channel decode"),
                    }
                }
            }
            closed.cancel();
            // Wake every waiter: their streams can no longer complete.
            routes.lock().unwrap().clear();
        });
        conn
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn close(&self) {
        self.closed.cancel();
    }

    fn open_stream(&self) -> (u32, mpsc::UnboundedReceiver<Frame>) {
        // Host-opened streams are odd, leaving even ids for guest-opened streams in a later protocol.
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(id, tx);
        (id, rx)
    }

    fn send(&self, frame: Frame) -> Result<(), GuestError> {
        self.out.send(frame).map_err(|_| GuestError::Closed)
    }

    /// Sends a request and waits for its single response.
    pub async fn request(&self, req: &GuestRequest, timeout: Duration) -> Result<GuestResponse, GuestError> {
        let (id, mut rx) = self.open_stream();
        self.send(Frame::json(FrameKind::Request, id, req))?;
        let res = tokio::time::timeout(timeout, async {
            while let Some(f) = rx.recv().await {
                if f.kind == FrameKind::Response {
                    return f.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()));
                }
            }
            Err(GuestError::Closed)
        })
        .await;
        if res.is_err() {
            self.routes.lock().unwrap().remove(&id);
        }
        res.map_err(|_| GuestError::Timeout(timeout))?
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
            let attempt = self.request(&GuestRequest::Hello { protocol: PROTOCOL_VERSION }, Duration::from_millis(500));
            let res = tokio::select! {
                r = attempt => r,
                _ = cancel.cancelled() => return Err(GuestError::Cancelled),
            };
            match res {
                Ok(GuestResponse::Hello { protocol, agent }) if protocol == PROTOCOL_VERSION => return Ok(agent),
                Ok(GuestResponse::Error { message }) => return Err(GuestError::Agent(message)),
                Ok(other) => return Err(GuestError::Protocol(format!("{other:?}"))),
                Err(GuestError::Timeout(_)) if tokio::time::Instant::now() < deadline => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One round trip through the channel and the agent's request loop, nothing else (`banger bench`).
    pub async fn echo(&self, data: &str) -> Result<(), GuestError> {
        match self.request(&GuestRequest::Echo { data: data.to_string() }, Duration::from_secs(5)).await? {
            GuestResponse::Echo { data: back } if back == data => Ok(()),
            other => Err(GuestError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn health(&self) -> Result<GuestHealth, GuestError> {
        match self.request(&GuestRequest::Health, Duration::from_secs(5)).await? {
            GuestResponse::Health(h) => Ok(h),
            GuestResponse::Error { message } => Err(GuestError::Agent(message)),
            other => Err(GuestError::Protocol(format!("{other:?}"))),
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

    /// Runs a command to completion, passing its output to the two captures.
    pub async fn exec_captured(
        &self,
        spec: ExecSpec,
        stdin: Option<Vec<u8>>,
        stdout: &mut Capture,
        stderr: &mut Capture,
        cancel: &CancellationToken,
    ) -> Result<ExitStatus, GuestError> {
        let (id, mut rx) = self.open_stream();
        let has_stdin = stdin.is_some();
        self.send(Frame::json(FrameKind::Request, id, &GuestRequest::Exec(ExecSpec { stdin: has_stdin, ..spec })))?;
        if let Some(data) = stdin {
            for chunk in data.chunks(MAX_PAYLOAD) {
                self.send(Frame::new(FrameKind::Stdin, id, chunk.to_vec()))?;
            }
            self.send(Frame::new(FrameKind::StdinEof, id, vec![]))?;
        }
        let mut cancelled = false;
        loop {
            let frame = tokio::select! {
                f = rx.recv() => f,
                _ = cancel.cancelled(), if !cancelled => {
                    // Ask the guest to kill the command; its final response still arrives.
                    cancelled = true;
                    let _ = self.send(Frame::new(FrameKind::Cancel, id, vec![]));
                    continue;
                }
            };
            let Some(frame) = frame else {
                return Err(GuestError::Closed);
            };
            match frame.kind {
                FrameKind::Stdout => stdout.push(&frame.payload),
                FrameKind::Stderr => stderr.push(&frame.payload),
                FrameKind::Response => {
                    return match frame.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()))? {
                        _ if cancelled => Err(GuestError::Cancelled),
                        GuestResponse::Exited(st) => Ok(st),
                        GuestResponse::Error { message } => Err(GuestError::Agent(message)),
                        other => Err(GuestError::Protocol(format!("{other:?}"))),
                    };
                }
                _ => {}
            }
        }
    }
}

impl GuestConn {
    /// Writes `data` to a file in the guest; returns the file's size afterwards.
    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        append: bool,
        data: &[u8],
    ) -> Result<u64, GuestError> {
        let (id, mut rx) = self.open_stream();
        let req = GuestRequest::WriteFile { path: path.to_string(), mode, append, make_dirs: true };
        self.send(Frame::json(FrameKind::Request, id, &req))?;
        for chunk in data.chunks(MAX_PAYLOAD) {
            self.send(Frame::new(FrameKind::Stdin, id, chunk.to_vec()))?;
        }
        self.send(Frame::new(FrameKind::StdinEof, id, vec![]))?;
        while let Some(f) = rx.recv().await {
            if f.kind == FrameKind::Response {
                return match f.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()))? {
                    GuestResponse::Written { size, .. } => Ok(size),
                    GuestResponse::Error { message } => Err(GuestError::Agent(message)),
                    other => Err(GuestError::Protocol(format!("{other:?}"))),
                };
            }
        }
        Err(GuestError::Closed)
    }

    /// Reads up to `limit` bytes at `offset`; returns them with the file's size and mode.
    pub async fn read_file(&self, path: &str, offset: u64, limit: u64) -> Result<(Vec<u8>, u64, u32), GuestError> {
        let (id, mut rx) = self.open_stream();
        self.send(Frame::json(
            FrameKind::Request,
            id,
            &GuestRequest::ReadFile { path: path.to_string(), offset, limit },
        ))?;
        let mut data = vec![];
        while let Some(f) = rx.recv().await {
            match f.kind {
                FrameKind::Stdout => data.extend_from_slice(&f.payload),
                FrameKind::Response => {
                    return match f.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()))? {
                        GuestResponse::FileData { size, mode } => Ok((data, size, mode)),
                        GuestResponse::Error { message } => Err(GuestError::Agent(message)),
                        other => Err(GuestError::Protocol(format!("{other:?}"))),
                    };
                }
                _ => {}
            }
        }
        Err(GuestError::Closed)
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
}

/// Largest spooled stream: output beyond it is dropped and the stream reported as cut.
pub const MAX_SPOOL: u64 = 1 << 30;

impl Capture {
    pub fn new(limit: usize, spool_path: Option<PathBuf>) -> Capture {
        Capture { inline: vec![], limit, spool_path, spool: None, spooled: 0, total: 0, spool_failed: false }
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
        if let Some(f) = &mut self.spool {
            let take = data.len().min((MAX_SPOOL - self.spooled) as usize);
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
    pub async fn session_send(&self, id: &str, data: &[u8], eof: bool) -> Result<(u64, bool), GuestError> {
        let (stream, mut rx) = self.open_stream();
        self.send(Frame::json(FrameKind::Request, stream, &GuestRequest::SessionSend { id: id.to_string(), eof }))?;
        for chunk in data.chunks(MAX_PAYLOAD) {
            self.send(Frame::new(FrameKind::Stdin, stream, chunk.to_vec()))?;
        }
        self.send(Frame::new(FrameKind::StdinEof, stream, vec![]))?;
        while let Some(f) = rx.recv().await {
            if f.kind == FrameKind::Response {
                return match f.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()))? {
                    GuestResponse::SessionSent { bytes, stdin_open } => Ok((bytes, stdin_open)),
                    GuestResponse::Error { message } => Err(GuestError::Agent(message)),
                    other => Err(GuestError::Protocol(format!("{other:?}"))),
                };
            }
        }
        Err(GuestError::Closed)
    }

    /// Reads a session's log from `offset`, the agent waiting up to `wait_ms` for output first.
    pub async fn session_read(
        &self,
        id: &str,
        offset: u64,
        limit: u64,
        wait_ms: u64,
    ) -> Result<SessionRead, GuestError> {
        let (stream, mut rx) = self.open_stream();
        let req = GuestRequest::SessionRead { id: id.to_string(), offset, limit, wait_ms };
        self.send(Frame::json(FrameKind::Request, stream, &req))?;
        // The agent answers by wait_ms; beyond that (plus transfer time) it is not answering at all.
        let limit_wait = Duration::from_millis(wait_ms) + Duration::from_secs(30);
        let mut runs: Vec<(FrameKind, Vec<u8>)> = vec![];
        let result = tokio::time::timeout(limit_wait, async {
            while let Some(f) = rx.recv().await {
                match f.kind {
                    FrameKind::Stdout | FrameKind::Stderr => match runs.last_mut() {
                        Some((kind, data)) if *kind == f.kind => data.extend_from_slice(&f.payload),
                        _ => runs.push((f.kind, f.payload)),
                    },
                    FrameKind::Response => {
                        return match f.parse::<GuestResponse>().map_err(|e| GuestError::Protocol(e.to_string()))? {
                            GuestResponse::SessionData { from, status } => Ok((from, status)),
                            GuestResponse::Error { message } => Err(GuestError::Agent(message)),
                            other => Err(GuestError::Protocol(format!("{other:?}"))),
                        };
                    }
                    _ => {}
                }
            }
            Err(GuestError::Closed)
        })
        .await;
        let (from, status) = match result {
            Ok(r) => r?,
            Err(_) => {
                self.routes.lock().unwrap().remove(&stream);
                return Err(GuestError::Timeout(limit_wait));
            }
        };
        Ok(SessionRead { from, runs, status })
    }
}
