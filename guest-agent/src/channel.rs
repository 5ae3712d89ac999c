//! The host-guest byte stream: a virtio-serial port named `org.banger.agent.0`.
//!
//! virtio-serial survives QEMU snapshot/restore (vhost-user-vsock does not), and it needs no guest network.
//! Reads return 0 while no host is connected; the reader then waits and retries, and forgets any partial
//! frame, since the next host connection starts a fresh stream of frames.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tools_schema::guest::{Frame, FrameDecoder, FrameKind, GuestErrorKind, GuestResponse, VIRTIO_PORT_NAME};

/// Finds the device node of the banger virtio-serial port.
pub fn find_port() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in entries.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == VIRTIO_PORT_NAME {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

/// Events from the channel reader.
pub enum Incoming {
    Frame(Frame),
    /// The host disconnected: streams it started are orphaned.
    HostGone,
}

/// Serves one async byte stream (a vsock connection): frames out through a writer task, frames in from a
/// reader task, which reports `HostGone` at EOF.
pub fn from_stream<R, W>(mut rd: R, mut wr: W) -> (mpsc::UnboundedSender<Frame>, mpsc::UnboundedReceiver<Incoming>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            dec.push(&buf[..n]);
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => {
                        let _ = in_tx.send(Incoming::Frame(f));
                    }
                    Ok(None) => break,
                    Err(e) => eprintln!("banger-agent: channel: {e}"),
                }
            }
        }
        let _ = in_tx.send(Incoming::HostGone);
    });
    tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if wr.write_all(&frame.encode()).await.is_err() {
                return;
            }
        }
    });
    (out_tx, in_rx)
}

/// Opens the port and starts a reader and a writer thread. Frames sent to the returned sender are written
/// in order; frames read arrive on the returned receiver.
pub fn open(path: PathBuf) -> std::io::Result<(mpsc::UnboundedSender<Frame>, mpsc::UnboundedReceiver<Incoming>)> {
    let file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let reader: Arc<File> = file.clone();
    std::thread::spawn(move || {
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut connected = false;
        loop {
            match (&*reader).read(&mut buf) {
                Ok(0) => {
                    if connected {
                        connected = false;
                        dec.reset();
                        let _ = in_tx.send(Incoming::HostGone);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(n) => {
                    connected = true;
                    dec.push(&buf[..n]);
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                if in_tx.send(Incoming::Frame(f)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => eprintln!("banger-agent: channel: {e}"),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("banger-agent: channel read: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    });
    let writer = file;
    std::thread::spawn(move || {
        while let Some(frame) = out_rx.blocking_recv() {
            if let Err(e) = (&*writer).write_all(&frame.encode()) {
                eprintln!("banger-agent: channel write: {e}");
            }
        }
    });
    Ok((out_tx, in_rx))
}

/// Sends the one response of a request stream (handlers call it; the request loop owns no handler).
pub fn respond(out: &mpsc::UnboundedSender<Frame>, stream: u32, response: GuestResponse) {
    let _ = out.send(Frame::json(FrameKind::Response, stream, &response));
}

/// A request the agent could not do: the kind the host acts on, and the message a human reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: GuestErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: GuestErrorKind, message: impl Into<String>) -> Self {
        Failure { kind, message: message.into() }
    }
}

impl From<Failure> for GuestResponse {
    fn from(f: Failure) -> Self {
        GuestResponse::error(f.kind, f.message)
    }
}
