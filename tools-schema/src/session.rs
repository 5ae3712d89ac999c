//! Pipe-mode sessions: long-lived guest commands with a stdin pipe and a replayable output log.
//!
//! A session lives in the guest agent (process, stdin pipe, on-disk output log, state file), so a daemon
//! restart or a client disconnect never touches it. Its output is one log of bytes in arrival order; the
//! cursor is a byte offset into that log, and every chunk says whether it came from stdout or stderr.
//!
//! This module holds the daemon operations' params/results, the JSON-RPC subscription events, and the
//! guest-protocol payloads of the session requests (`Guest*`).
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vm::{validate_name, ContentEncoding};

/// Largest message one `session.send` writes (the agent writes it whole before the next one).
pub const MAX_SEND_BYTES: u64 = 8 << 20;
/// Default and largest number of log bytes one `session.logs` returns.
pub const DEFAULT_LOGS_LIMIT: u64 = 64 << 10;
pub const MAX_LOGS_LIMIT: u64 = 1 << 20;
/// Longest `session.logs` may wait for new output.
pub const MAX_WAIT_MS: u64 = 60_000;

/// Start a long-lived command in a running VM, with a stdin pipe and a replayable output log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionStartParams {
    /// VM name or id.
    pub vm: String,
    /// Session name, unique in the VM (VM name rules); the id always works.
    #[serde(default)]
    pub name: Option<String>,
    /// Program and arguments, e.g. ["python3", "-u", "agent.py"]. Use ["sh", "-c", "..."] for shell syntax.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Absolute working directory in the guest. Default /root.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables (PATH, HOME, USER and LANG are set unless given).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Written to its stdin once it runs (add "\n" for line protocols).
    #[serde(default)]
    pub input: Option<String>,
    /// Close stdin after `input`.
    #[serde(default)]
    pub eof: bool,
    /// Wait up to this many ms for its first output (or its end), returned in `output`.
    #[serde(default)]
    #[schemars(range(max = 60000))]
    pub wait_ms: Option<u64>,
}

/// A started session, and its first output when `wait_ms` asked for it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionStartResult {
    #[serde(flatten)]
    pub session: SessionInfo,
    /// Output from offset 0, read after `input` was written (present when `wait_ms` was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<SessionLogs>,
}

/// Refers to one session: by id (or unique id prefix), or by name; `vm` narrows the search to one VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRef {
    /// Session id, unique id prefix (4+ characters), or session name.
    pub session: String,
    /// VM name or id, needed when a session name is used in several VMs.
    #[serde(default)]
    pub vm: Option<String>,
}

/// Stop a session: SIGTERM to its process group, SIGKILL after the grace period.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionStopParams {
    /// Session id, id prefix or name.
    pub session: String,
    /// Its VM, if the name is used in several.
    #[serde(default)]
    pub vm: Option<String>,
    /// Seconds to wait after SIGTERM before SIGKILL (0-300). Default 5.
    #[serde(default)]
    #[schemars(range(max = 300))]
    pub grace_secs: Option<u64>,
}

/// Write to a session's stdin without attaching. One message is written whole: concurrent sends never
/// interleave inside a message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionSendParams {
    /// Session id, id prefix or name.
    pub session: String,
    /// Its VM, if the name is used in several.
    #[serde(default)]
    pub vm: Option<String>,
    /// The bytes to write (add "\n" for line protocols), up to 8 MiB.
    pub data: String,
    /// `text` (default) or `base64` for binary data.
    #[serde(default)]
    pub encoding: Option<ContentEncoding>,
    /// Close stdin after writing.
    #[serde(default)]
    pub eof: bool,
    /// Wait up to this many ms for the output that follows (or its end), returned in `output`.
    #[serde(default)]
    #[schemars(range(max = 60000))]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionSendResult {
    pub session: String,
    /// Bytes written to the session's stdin.
    pub bytes: u64,
    /// Whether stdin is now closed.
    pub stdin_closed: bool,
    /// Output from where the log ended before the write (present when `wait_ms` was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<SessionLogs>,
}

/// Read a session's output log from a cursor, optionally waiting briefly for output that has not arrived.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionLogsParams {
    /// Session id, id prefix or name.
    pub session: String,
    /// Its VM, if the name is used in several.
    #[serde(default)]
    pub vm: Option<String>,
    /// Byte offset to read from (the `next_offset` of the previous read). Default 0: from the start.
    #[serde(default, alias = "from")]
    pub offset: Option<u64>,
    /// Most bytes to return (default 65536); `more` says if there is more.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1048576))]
    pub limit: Option<u64>,
    /// Wait up to this many ms for output (or its end) when nothing new is at `offset`.
    #[serde(default)]
    #[schemars(range(max = 60000))]
    pub wait_ms: Option<u64>,
}

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A run of output bytes from one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutputChunk {
    pub stream: OutputStream,
    /// Log offset of the chunk's first byte.
    pub offset: u64,
    /// The bytes: UTF-8 text, or base64 when they are not valid UTF-8 on their own.
    pub data: String,
    pub encoding: ContentEncoding,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionLogs {
    pub session: String,
    /// Where this read started.
    pub from: u64,
    /// Cursor for the next read.
    pub next_offset: u64,
    /// Bytes in the log so far.
    pub size: u64,
    /// More output is already there after `next_offset` (this read hit its limit).
    pub more: bool,
    /// Output in log order, consecutive bytes of one stream merged.
    pub chunks: Vec<OutputChunk>,
    /// The session's state when the read finished; `running` means more output may come.
    pub state: SessionState,
    /// Its exit code, once it `exited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended it, once it was `killed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// The command runs and accepts stdin.
    Running,
    /// The command exited on its own; see `exit_code`.
    Exited,
    /// The command was ended by a signal (session.stop, session.kill, or anything else); see `signal`.
    Killed,
    /// banger lost track of the command: its VM stopped, or the guest agent restarted. See `lost_reason`.
    Lost,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Exited => "exited",
            SessionState::Killed => "killed",
            SessionState::Lost => "lost",
        }
    }
    pub fn is_final(self) -> bool {
        self != SessionState::Running
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionInfo {
    pub id: String,
    pub name: Option<String>,
    /// Name of the VM the session runs in.
    pub vm: String,
    pub vm_id: String,
    pub command: Vec<String>,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub state: SessionState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why the session is `lost`.
    pub lost_reason: Option<String>,
    /// When the daemon created the session (Unix seconds, host clock).
    pub created_at: i64,
    /// Start and end as the guest's clock saw them (Unix milliseconds).
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    /// How long it ran (or has been running), measured in the guest.
    pub runtime_ms: Option<u64>,
    /// Launch diagnostics: the program as resolved on the guest's PATH, and the process (group) id.
    pub program: Option<String>,
    pub pid: Option<u32>,
    /// Bytes in the output log; `session.logs` reads them.
    pub output_bytes: u64,
    /// Whether stdin is still open.
    pub stdin_open: bool,
    /// Whether someone is attached (`banger vm session attach`, JSON-RPC `session.attach`).
    pub attached: bool,
}

/// Sessions, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

/// List sessions, of one VM or of all.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionListParams {
    /// VM name or id; every VM when omitted.
    #[serde(default)]
    pub vm: Option<String>,
}

/// Params of the JSON-RPC subscriptions `session.subscribe` (any number of followers) and `session.attach`
/// (one attacher at a time).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionFollowParams {
    /// Session id, id prefix or name.
    pub session: String,
    /// Its VM, if the name is used in several.
    #[serde(default)]
    pub vm: Option<String>,
    /// Log offset to start from. Default: the current end (only new output); 0 replays everything.
    #[serde(default)]
    pub from: Option<u64>,
    /// `session.attach` only: take the attachment from whoever holds it (they get a `detached` event).
    #[serde(default)]
    pub steal: bool,
}

/// One notification of a session subscription (`session.output`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// New output.
    Output(OutputChunk),
    /// The session ended and every byte of output has been delivered; the subscription closes.
    Ended { session: Box<SessionInfo> },
    /// Another client took the attachment (`steal`); the subscription closes, the session runs on.
    Detached { reason: String },
}

/// JSON-RPC subscriptions: (subscribe method, notification method, unsubscribe method, description).
/// They exist on JSON-RPC over WebSocket only; MCP clients follow with `session.logs` and `wait_ms`.
pub const SUBSCRIPTIONS: &[(&str, &str, &str, &str)] = &[
    (
        "session.subscribe",
        "session.output",
        "session.unsubscribe",
        "Follow a session's output without polling: params SessionFollowParams (`from` = 0 replays), \
         notifications SessionEvent (`output` chunks in log order, then `ended` when it ends). Any number \
         of subscribers.",
    ),
    (
        "session.attach",
        "session.output",
        "session.detach",
        "Like session.subscribe, and claims the session's attachment: only one attacher at a time, released \
         when it unsubscribes or disconnects. A second attach is refused with `busy` unless it passes \
         `steal`, which sends the holder a `detached` event. Send input with session.send.",
    ),
];

impl SessionStartParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("command must name a program, e.g. [\"sh\", \"-c\", \"cat\"]".into());
        }
        if let Some(n) = &self.name {
            validate_name("session", n)?;
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(format!("cwd must be an absolute path, got `{cwd}`"));
            }
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("environment variable name `{k}` is invalid"));
            }
        }
        if let Some(input) = &self.input {
            if input.len() as u64 > MAX_SEND_BYTES {
                return Err(format!("input is {} bytes; at most {MAX_SEND_BYTES}", input.len()));
            }
        }
        validate_wait(self.wait_ms)
    }
}

impl SessionSendParams {
    pub fn validate(&self) -> Result<(), String> {
        validate_wait(self.wait_ms)
    }
}

fn validate_wait(wait_ms: Option<u64>) -> Result<(), String> {
    match wait_ms {
        Some(w) if w > MAX_WAIT_MS => Err(format!("wait_ms must be at most {MAX_WAIT_MS}, got {w}")),
        _ => Ok(()),
    }
}

impl SessionLogsParams {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(l) = self.limit {
            if l == 0 || l > MAX_LOGS_LIMIT {
                return Err(format!("limit must be between 1 and {MAX_LOGS_LIMIT}, got {l}"));
            }
        }
        validate_wait(self.wait_ms)
    }
}

impl SessionStopParams {
    pub fn validate(&self) -> Result<(), String> {
        match self.grace_secs {
            Some(g) if g > 300 => Err(format!("grace_secs must be at most 300, got {g}")),
            _ => Ok(()),
        }
    }
}

/// Guest protocol: start a session (the daemon chose the id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSessionSpec {
    pub id: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: String,
}

/// Guest protocol: a session as the agent knows it (also its on-disk state file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSessionStatus {
    pub id: String,
    pub state: SessionState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub lost_reason: Option<String>,
    pub program: String,
    pub pid: Option<u32>,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub runtime_ms: u64,
    pub output_bytes: u64,
    pub stdin_open: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_params_are_checked_before_anything_runs() {
        let ok = SessionStartParams { vm: "a".into(), command: vec!["cat".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
        let empty = SessionStartParams { command: vec![], ..ok.clone() };
        assert!(empty.validate().unwrap_err().contains("command"));
        let rel = SessionStartParams { cwd: Some("tmp".into()), ..ok.clone() };
        assert!(rel.validate().unwrap_err().contains("absolute"));
        let bad_name = SessionStartParams { name: Some("Bad Name".into()), ..ok.clone() };
        assert!(bad_name.validate().unwrap_err().contains("session name"));
        let mut env = BTreeMap::new();
        env.insert("A=B".to_string(), "x".to_string());
        assert!(SessionStartParams { env, ..ok }.validate().unwrap_err().contains("A=B"));
    }

    #[test]
    fn events_are_tagged() {
        let v = serde_json::to_value(SessionEvent::Detached { reason: "x".into() }).unwrap();
        assert_eq!(v, serde_json::json!({"event": "detached", "reason": "x"}));
    }
}
