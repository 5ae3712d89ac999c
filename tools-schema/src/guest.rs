//! The guest protocol: how the daemon talks to `banger-agent` over a host-guest byte stream
//! (virtio-serial or vsock).
//!
//! One connection carries any number of concurrent requests. Everything is a frame:
//!
//! ```text
//! magic "BG" (2) | version (1) | kind (1) | stream id (u32 BE) | payload length (u32 BE) | payload
//! ```
//!
//! The host opens a stream by sending a `Request` frame with a fresh odd stream id; every other frame of
//! that exchange carries the same id, and the stream ends with one `Response` frame. Control payloads are
//! JSON; data payloads (stdin/stdout/stderr) are raw bytes, so binary content costs nothing extra.
//! A decoder that meets bytes that are not a valid header skips to the next magic, so a half-written frame
//! from a host that died mid-write cannot wedge the channel.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::BuildInfo;

/// Version of this protocol. Both ends must agree; `Hello` checks it before anything else is sent.
pub const PROTOCOL_VERSION: u8 = 1;
pub const MAGIC: [u8; 2] = *b"BG";
pub const HEADER_LEN: usize = 12;
/// Largest payload of one frame. Bigger data is split into several data frames.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Name of the virtio-serial port the agent listens on.
pub const VIRTIO_PORT_NAME: &str = "org.banger.agent.0";
/// vsock port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;
/// Host vsock port a booting agent connects to, once, to say it listens on `VSOCK_PORT` (the VMM hands the
/// connection to `<uds>_1025` on the host). Under QEMU the host connects only after that: a connection
/// vhost-device-vsock takes before the guest's vsock device is up can be left unanswered for good.
pub const VSOCK_READY_PORT: u32 = 1025;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Host -> guest: JSON `GuestRequest`, opens the stream.
    Request = 1,
    /// Guest -> host: JSON `GuestResponse`, closes the stream.
    Response = 2,
    /// Host -> guest: stdin bytes for an exec stream.
    Stdin = 3,
    /// Host -> guest: stdin is finished (empty payload).
    StdinEof = 4,
    /// Guest -> host: stdout bytes.
    Stdout = 5,
    /// Guest -> host: stderr bytes.
    Stderr = 6,
    /// Host -> guest: abandon the stream (kill its process); the guest still sends a `Response`.
    Cancel = 7,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Stdin,
            4 => FrameKind::StdinEof,
            5 => FrameKind::Stdout,
            6 => FrameKind::Stderr,
            7 => FrameKind::Cancel,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, stream: u32, payload: Vec<u8>) -> Self {
        Frame { kind, stream, payload }
    }
    pub fn json<T: Serialize>(kind: FrameKind, stream: u32, msg: &T) -> Self {
        Frame::new(kind, stream, serde_json::to_vec(msg).expect("guest messages always serialise"))
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(PROTOCOL_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Something the decoder had to skip or refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("peer speaks guest protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    VersionMismatch(u8),
    #[error("skipped {0} bytes that were not a frame")]
    Resynced(usize),
}

/// Incremental frame decoder: feed it bytes as they arrive, take frames out.
///
/// Taken bytes are not moved out one frame at a time: `start` marks where the untaken bytes begin, and the
/// buffer is compacted when new bytes arrive. A peer sending a burst of tiny frames costs time linear in
/// its bytes, not their square (a 256 KiB read of empty frames is 21k frames).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }
    /// Forget any partial frame (the peer reconnected).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
    /// The next complete frame, `Ok(None)` when more bytes are needed. An `Err` reports skipped garbage or
    /// a version mismatch; decoding can continue after it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let garbage = self.skip_to_header();
        if garbage > 0 {
            return Err(DecodeError::Resynced(garbage));
        }
        let rest = &self.buf[self.start..];
        if rest.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = rest[2];
        if version != PROTOCOL_VERSION {
            // Step past the magic so the next call resyncs past this frame.
            self.start += 2;
            return Err(DecodeError::VersionMismatch(version));
        }
        let kind = FrameKind::from_u8(rest[3]).expect("checked by skip_to_header");
        let stream = u32::from_be_bytes(rest[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        if rest.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = rest[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        Ok(Some(Frame { kind, stream, payload }))
    }

    /// Steps past bytes before the first plausible header; returns how many were skipped.
    fn skip_to_header(&mut self) -> usize {
        let rest = &self.buf[self.start..];
        let mut i = 0;
        while i < rest.len() {
            let at = &rest[i..];
            let plausible = at[0] == MAGIC[0]
                && (at.len() < 2 || at[1] == MAGIC[1])
                && (at.len() < 4 || FrameKind::from_u8(at[3]).is_some() || at[2] != PROTOCOL_VERSION)
                && (at.len() < HEADER_LEN || u32::from_be_bytes(at[8..12].try_into().unwrap()) as usize <= MAX_PAYLOAD);
            if plausible {
                break;
            }
            i += 1;
        }
        self.start += i;
        i
    }
}

/// What the host asks of the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GuestRequest {
    /// First request on a connection: agree on the protocol.
    Hello { protocol: u8 },
    /// Is the agent alive, and which build is it.
    Health,
    /// Answered at once with the same data (`Echo`): the channel's own round trip, for `banger bench`.
    Echo { data: String },
    /// Run a program. Output arrives as Stdout/Stderr frames, then an `Exited` response.
    Exec(ExecSpec),
    /// Power the guest off (or reboot it). The agent syncs filesystems first.
    Shutdown { reboot: bool },
    /// Resource use as the guest sees it.
    Stats,
    /// Sockets listening in the guest (TCP listeners, bound UDP sockets), with their processes.
    Ports,
    /// Write a file from the Stdin frames that follow (ended by StdinEof). Answered with `Written`.
    WriteFile { path: String, mode: Option<u32>, append: bool, make_dirs: bool },
    /// Read up to `limit` bytes from `offset`, sent as Stdout frames. Answered with `FileData`.
    ReadFile { path: String, offset: u64, limit: u64 },
    /// Start a session (after checking its cwd and program). Answered with `SessionStatus`.
    SessionStart(crate::session::GuestSessionSpec),
    /// Write the Stdin frames that follow (ended by StdinEof) to a session's stdin as one message, whole,
    /// then close stdin if `eof`. Answered with `SessionSent`.
    SessionSend { id: String, eof: bool },
    /// Send up to `limit` log bytes from `offset` as Stdout/Stderr frames, after waiting up to `wait_ms`
    /// for output past `offset` (or the end of the session). Answered with `SessionData`.
    SessionRead { id: String, offset: u64, limit: u64, wait_ms: u64 },
    /// Every session the agent knows (running, ended, or lost by an earlier agent). Answered with `Sessions`.
    SessionList,
    /// Signal a session's process group, SIGKILL after `grace_ms` if it is still running, and wait for the
    /// end. Answered with `SessionStatus`.
    SessionSignal { id: String, signal: i32, grace_ms: u64 },
    /// Become a VM of one's own after a restore from a template snapshot: every clone of a template wakes
    /// up with the template's clock, RNG state, hostname, addresses and SSH host key. Answered with `Ok`
    /// once all of it is replaced (sshd is started without waiting for it).
    Reidentify(CloneIdentity),
    /// The public half of this VM's SSH host key, so the host can pin it in its known_hosts (learned over
    /// this channel, never from the network a guest shares with others). The key is made beside readiness,
    /// so the agent waits up to `wait_ms` (at most `SSH_HOST_KEY_WAIT_MAX_MS`) for it. Answered with
    /// `SshHostKey`.
    SshHostKey { wait_ms: u64 },
}

/// Longest an agent waits for its SSH host key before it answers `SshHostKey` with an error.
pub const SSH_HOST_KEY_WAIT_MAX_MS: u64 = 120_000;
/// Largest `SshHostKey` answer the host accepts (an RSA-16384 public key line is about 2.8 KiB).
pub const SSH_HOST_KEY_MAX_BYTES: usize = 8 * 1024;

/// Everything that makes a restored clone its own VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneIdentity {
    pub hostname: String,
    /// Network settings; `None` when the VM has no NIC.
    #[serde(default)]
    pub net: Option<GuestNetConfig>,
    /// Public key to authorise for root's SSH logins.
    #[serde(default)]
    pub ssh_authorized_key: Option<String>,
    /// Fresh host entropy (hex), credited to the guest's pool before the kernel RNG is reseeded.
    pub entropy_hex: String,
    /// The host's wall clock (nanoseconds since the Unix epoch) when the request was sent.
    pub unix_time_ns: u64,
    /// A warm-pool VM's dry run with a placeholder identity: every step runs (so the real request later runs
    /// on warm code paths, which matters under software emulation) except starting sshd.
    #[serde(default)]
    pub rehearsal: bool,
}

/// A guest NIC's static settings, the same the kernel command line carries for a cold boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestNetConfig {
    /// `ADDRESS/PREFIX`.
    pub address: String,
    pub gateway: String,
    pub dns: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// When false the program's stdin is /dev/null; when true the host sends Stdin frames and a StdinEof.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the program (and its process group) after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// What the guest answers; exactly one per stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum GuestResponse {
    Hello {
        protocol: u8,
        agent: BuildInfo,
    },
    Health(GuestHealth),
    Echo {
        data: String,
    },
    Exited(ExitStatus),
    Stats(crate::vm::GuestStats),
    Ports {
        listeners: Vec<GuestListener>,
    },
    Written {
        bytes: u64,
        size: u64,
    },
    FileData {
        size: u64,
        mode: u32,
    },
    SessionStatus(crate::session::GuestSessionStatus),
    SessionSent {
        bytes: u64,
        stdin_open: bool,
    },
    /// After the data frames of a `SessionRead`: the bytes sent start at `from`; `status` as of the read.
    SessionData {
        from: u64,
        status: crate::session::GuestSessionStatus,
    },
    Sessions {
        sessions: Vec<crate::session::GuestSessionStatus>,
    },
    /// One line of `ssh_host_*_key.pub`: `TYPE BASE64 [COMMENT]`. Untrusted: the host validates it.
    SshHostKey {
        public_key: String,
    },
    Ok,
    /// The request failed. The host acts on `kind` alone; `message` is for a human, and untrusted: the host
    /// caps and escapes it before anyone sees it.
    Error {
        /// What the host can do about it. An agent that predates kinds sends none, and a kind this side does
        /// not know (a newer agent, or a hostile one) reads as `other`.
        #[serde(default, deserialize_with = "GuestErrorKind::lenient")]
        kind: GuestErrorKind,
        message: String,
    },
}

impl GuestResponse {
    pub fn error(kind: GuestErrorKind, message: impl Into<String>) -> Self {
        GuestResponse::Error { kind, message: message.into() }
    }
}

/// Why the agent refused or failed a request: the cases the host tells apart, plus a catch-all. The host
/// never reads the message to decide what a failure means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestErrorKind {
    /// The file, directory or session the request names does not exist in the guest.
    NotFound,
    /// The request is wrong as asked (a path that is a directory or not readable, an invalid id or signal,
    /// a malformed request).
    Invalid,
    /// The program cannot be started though it and its working directory are there.
    CannotRun,
    /// The program is not there: not on the guest's PATH, no such file, or not executable.
    ProgramMissing,
    /// The working directory is not there, or not a directory.
    CwdMissing,
    /// A read starts past the end of a session's log.
    BadOffset,
    /// A session's stdin takes no more input: an earlier send closed it, the session ended, or its
    /// program stopped reading.
    InputClosed,
    /// Anything else, and every kind this side does not know.
    #[default]
    #[serde(other)]
    Other,
}

impl GuestErrorKind {
    /// Any JSON value decodes: a known name is its kind, anything else (an unknown name, a number, null, an
    /// object) is `Other`, so an agent newer, older or hostile can never make an error undecodable.
    fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Known(GuestErrorKind),
            Unknown(serde::de::IgnoredAny),
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Known(k) => k,
            Wire::Unknown(_) => GuestErrorKind::Other,
        })
    }
}

/// One listening socket, as the guest's kernel reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestListener {
    /// `tcp` or `udp`.
    pub proto: String,
    /// Bound address (`0.0.0.0`, `::`, `127.0.0.1`...).
    pub address: String,
    pub port: u16,
    pub pid: Option<u32>,
    /// Process name and full command line of the owner.
    pub process: Option<String>,
    pub command: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestHealth {
    pub agent: BuildInfo,
    /// Milliseconds since the guest kernel booted.
    pub uptime_ms: u64,
    pub hostname: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_when_fed_byte_by_byte() {
        let frames = vec![
            Frame::json(FrameKind::Request, 1, &GuestRequest::Health),
            Frame::new(FrameKind::Stdout, 3, vec![0, 255, b'B', b'G', 1, 2]),
            Frame::new(FrameKind::StdinEof, 3, vec![]),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        let mut dec = FrameDecoder::new();
        let mut out = vec![];
        for b in bytes {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn a_burst_of_tiny_frames_decodes_in_one_pass() {
        // 4 MiB of empty frames in one push, then a partial one finished by a second push. Moving the rest of
        // the buffer down after every frame (the old decoder) would copy ~700 GB here: the suite would time out.
        let tiny = Frame::new(FrameKind::Stdout, 7, vec![]).encode();
        let count = (4 << 20) / tiny.len();
        let last = Frame::new(FrameKind::Stderr, 8, b"end".to_vec()).encode();
        let mut burst = tiny.repeat(count);
        burst.extend_from_slice(&last[..5]);
        let mut dec = FrameDecoder::new();
        dec.push(&burst);
        let mut n = 0;
        while let Some(f) = dec.next_frame().unwrap() {
            assert_eq!((f.kind, f.stream, f.payload.len()), (FrameKind::Stdout, 7, 0));
            n += 1;
        }
        assert_eq!(n, count);
        dec.push(&last[5..]);
        assert_eq!(dec.next_frame().unwrap(), Some(Frame::new(FrameKind::Stderr, 8, b"end".to_vec())));
        assert_eq!(dec.next_frame().unwrap(), None);
    }

    #[test]
    fn decoder_skips_garbage_from_a_half_written_frame() {
        let good = Frame::json(FrameKind::Request, 5, &GuestRequest::Health);
        let mut dec = FrameDecoder::new();
        dec.push(b"xyz\x00garbage");
        dec.push(&good.encode());
        let err = dec.next_frame().unwrap_err();
        assert!(matches!(err, DecodeError::Resynced(n) if n > 0));
        assert_eq!(dec.next_frame().unwrap(), Some(good));
    }

    #[test]
    fn decoder_reports_a_version_mismatch() {
        let mut bytes = Frame::json(FrameKind::Request, 1, &GuestRequest::Health).encode();
        bytes[2] = PROTOCOL_VERSION + 1;
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(dec.next_frame(), Err(DecodeError::VersionMismatch(PROTOCOL_VERSION + 1)));
    }

    fn decode_error(json: &str) -> (GuestErrorKind, String) {
        match serde_json::from_str::<GuestResponse>(json).unwrap() {
            GuestResponse::Error { kind, message } => (kind, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_kinds_round_trip_by_name() {
        for kind in [
            GuestErrorKind::NotFound,
            GuestErrorKind::Invalid,
            GuestErrorKind::CannotRun,
            GuestErrorKind::ProgramMissing,
            GuestErrorKind::CwdMissing,
            GuestErrorKind::BadOffset,
            GuestErrorKind::InputClosed,
            GuestErrorKind::Other,
        ] {
            let json = serde_json::to_string(&GuestResponse::error(kind, "m")).unwrap();
            assert_eq!(decode_error(&json), (kind, "m".to_string()), "{json}");
        }
        let v = serde_json::to_value(GuestResponse::error(GuestErrorKind::BadOffset, "x")).unwrap();
        assert_eq!(v, serde_json::json!({"result": "error", "kind": "bad_offset", "message": "x"}));
    }

    #[test]
    fn an_error_without_a_kind_from_an_older_agent_still_decodes() {
        assert_eq!(
            decode_error(r#"{"result":"error","message":"no session `x` in the guest"}"#),
            (GuestErrorKind::Other, "no session `x` in the guest".to_string())
        );
    }

    #[test]
    fn an_unknown_or_bogus_kind_decodes_as_other() {
        for kind in [r#""disk_on_fire""#, r#""NotFound""#, "42", "null", "true", r#"{"not_found":1}"#, r#"["x"]"#] {
            let json = format!(r#"{{"result":"error","kind":{kind},"message":"m"}}"#);
            assert_eq!(decode_error(&json), (GuestErrorKind::Other, "m".to_string()), "{json}");
        }
        // A known kind is still read when an unknown field rides along.
        assert_eq!(
            decode_error(r#"{"result":"error","kind":"not_found","message":"m","x":1}"#).0,
            GuestErrorKind::NotFound
        );
    }

    #[test]
    fn request_json_is_tagged_by_op() {
        let v = serde_json::to_value(GuestRequest::Shutdown { reboot: false }).unwrap();
        assert_eq!(v, serde_json::json!({"op": "shutdown", "reboot": false}));
    }
}
