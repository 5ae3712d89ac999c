//! Pipe-mode sessions: the daemon's side.
//!
//! The session itself (process, stdin, output log, state) lives in the guest agent, so a daemon restart or
//! a client disconnect leaves it running. The daemon keeps a record per session (SQLite: VM, name, command,
//! cwd, env) for naming and listing, asks the agent for live state, and records the final state when the
//! VM stops under a session. Following output (subscriptions, `logs` with `wait_ms`) is a long-poll on the
//! agent, which wakes on new output: nothing polls, and nothing in the daemon has to be rebuilt after a
//! restart. The one piece of daemon memory is the attach claim, which by design ends with its connection.
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tools_schema::guest::{FrameKind, GuestRequest, GuestResponse};
use tools_schema::session::{
    GuestSessionSpec, GuestSessionStatus, OutputChunk, OutputStream, SessionEvent, SessionFollowParams, SessionInfo,
    SessionList, SessionListParams, SessionLogs, SessionLogsParams, SessionRef, SessionSendParams, SessionSendResult,
    SessionStartParams, SessionStartResult, SessionState, SessionStopParams, DEFAULT_LOGS_LIMIT, MAX_SEND_BYTES,
};
use tools_schema::vm::{ContentEncoding, VmState};
use tools_schema::{ApiError, ErrorCode};

use super::errors::guest_error;
use super::{now, CallContext, Engine};
use crate::guest::{GuestConn, GuestError};
use crate::store::{is_unique_violation, SessionRow, VmRow};

const DEFAULT_STOP_GRACE_SECS: u64 = 5;
/// How long one follow read waits in the agent for new output before asking again.
const FOLLOW_WAIT_MS: u64 = 15_000;
const FOLLOW_READ_LIMIT: u64 = 256 << 10;

/// Who is attached to which session. A claim is released when its guard drops (the subscriber went away)
/// or taken over by `steal`, which cancels the holder's token.
#[derive(Default)]
pub(crate) struct Attachments {
    held: Arc<Mutex<HashMap<String, (u64, CancellationToken)>>>,
    next: AtomicU64,
}

/// Holds an attachment until dropped.
pub struct AttachClaim {
    held: Arc<Mutex<HashMap<String, (u64, CancellationToken)>>>,
    session: String,
    token: u64,
    /// Cancelled when another client steals the attachment.
    pub stolen: CancellationToken,
}

impl Drop for AttachClaim {
    fn drop(&mut self) {
        let mut held = self.held.lock();
        // Only our own claim: after a steal the entry belongs to the new holder.
        if held.get(&self.session).is_some_and(|(t, _)| *t == self.token) {
            held.remove(&self.session);
        }
    }
}

impl Attachments {
    /// Checks and takes the claim in one critical section, so two attachers can never both succeed.
    /// `named` is how the caller knows the session (its name, else its id), for the refusal.
    fn claim(&self, session: &str, named: &str, steal: bool) -> Result<AttachClaim, ApiError> {
        let mut held = self.held.lock();
        if let Some((_, holder)) = held.get(session) {
            if !steal {
                return Err(ApiError::new(ErrorCode::Busy, format!("session `{named}` is already attached"))
                    .with_hint("detach the other client first, or attach with steal to take it over"));
            }
            holder.cancel();
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let stolen = CancellationToken::new();
        held.insert(session.to_string(), (token, stolen.clone()));
        Ok(AttachClaim { held: self.held.clone(), session: session.to_string(), token, stolen })
    }

    fn is_attached(&self, session: &str) -> bool {
        self.held.lock().contains_key(session)
    }
}

fn chunk(stream: FrameKind, offset: u64, bytes: Vec<u8>) -> OutputChunk {
    let stream = if stream == FrameKind::Stderr { OutputStream::Stderr } else { OutputStream::Stdout };
    // With no encoding asked for, bytes always encode (text if UTF-8, else base64).
    let (data, encoding) = super::vm::encode_chunk(&bytes, None, "output").expect("no encoding requested");
    OutputChunk { stream, offset, data, encoding }
}

/// A session as the caller most likely named it: its name if it has one, else its id.
fn label(row: &SessionRow) -> &str {
    row.name.as_deref().unwrap_or(&row.id)
}

/// How a session that is over ended, in words: "exited with code 0".
fn ended(s: &GuestSessionStatus) -> String {
    match s.state {
        SessionState::Exited => match s.exit_code {
            Some(code) => format!("exited with code {code}"),
            None => "exited".into(),
        },
        SessionState::Killed => match s.signal {
            Some(sig) => format!("was killed by signal {sig}"),
            None => "was killed".into(),
        },
        SessionState::Lost => format!("was lost ({})", s.lost_reason.as_deref().unwrap_or("no reason recorded")),
        SessionState::Running => "is running".into(),
    }
}

/// Input for a session that is over: what happened to it, and how to read it or run it again.
fn ended_error(row: &SessionRow, vm: &VmRow, s: &GuestSessionStatus) -> ApiError {
    let name = label(row);
    ApiError::precondition(format!("session `{name}` in VM {} {}: it takes no more input", vm.name, ended(s)))
        .with_hint("start a new session to go on")
        .with_next("session.logs", json!({"session": name, "vm": vm.name}), "reads everything it printed")
        .with_next(
            "session.start",
            json!({"vm": vm.name, "command": row.command, "cwd": row.cwd}),
            "starts the same command again",
        )
}

fn chunks(read: crate::guest::SessionRead) -> (Vec<OutputChunk>, u64, GuestSessionStatus) {
    let mut offset = read.from;
    let mut out = vec![];
    for (kind, bytes) in read.runs {
        let len = bytes.len() as u64;
        out.push(chunk(kind, offset, bytes));
        offset += len;
    }
    (out, offset, read.status)
}

impl Engine {
    /// Finds a session by id, unique id prefix (4+) or name, within one VM when `vm` is given.
    async fn resolve_session(&self, r: &str, vm: Option<&str>) -> Result<(SessionRow, VmRow), ApiError> {
        if r.is_empty() {
            return Err(ApiError::invalid("session reference is empty")
                .with_hint("name a session by its id, a unique id prefix or its name")
                .with_next("session.list", json!({}), "lists every session"));
        }
        let vm_row = match vm {
            Some(v) => Some(self.resolve_vm(v).await?),
            None => None,
        };
        let rows: Vec<SessionRow> = self
            .store
            .sessions()
            .await?
            .into_iter()
            .filter(|s| vm_row.as_ref().is_none_or(|v| v.id == s.vm_id))
            .collect();
        let exact: Vec<&SessionRow> = rows.iter().filter(|s| s.id == r || s.name.as_deref() == Some(r)).collect();
        let found: Vec<&SessionRow> = if exact.is_empty() && r.len() >= 4 {
            rows.iter().filter(|s| s.id.starts_with(r)).collect()
        } else {
            exact
        };
        let row = match found.as_slice() {
            [one] => (*one).clone(),
            [] => {
                let in_vm = vm_row.as_ref().map(|v| format!(" in VM {}", v.name)).unwrap_or_default();
                let list = match &vm_row {
                    Some(v) => json!({"vm": v.name}),
                    None => json!({}),
                };
                return Err(ApiError::not_found(format!("no session `{r}`{in_vm}"))
                    .with_hint("name a session by its id, a unique id prefix or its name")
                    .with_next("session.list", list, "lists the sessions"));
            }
            many => {
                return Err(ApiError::invalid(format!(
                    "`{r}` matches several sessions: {}",
                    many.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
                ))
                .with_hint("use the session id, or give its VM too"))
            }
        };
        let vm = match vm_row {
            Some(v) => v,
            None => self.store.vm(row.vm_id.clone()).await?.ok_or_else(|| {
                ApiError::not_found("the session's VM is gone")
                    .with_hint("the VM was deleted with its sessions")
                    .with_next("session.list", json!({}), "lists the sessions left")
            })?,
        };
        Ok((row, vm))
    }

    /// Live states of a running VM's sessions, by id.
    async fn guest_sessions(&self, vm: &VmRow) -> Result<HashMap<String, GuestSessionStatus>, ApiError> {
        let conn = self.guest(vm).await?;
        match conn.request(&GuestRequest::SessionList, Duration::from_secs(10), &CancellationToken::new()).await {
            Ok(GuestResponse::Sessions { sessions }) => Ok(sessions.into_iter().map(|s| (s.id.clone(), s)).collect()),
            Ok(other) => Err(guest_error(&vm.name, GuestError::protocol(format!("{other:?}")))),
            Err(e) => Err(guest_error(&vm.name, e)),
        }
    }

    /// The state to report: the recorded final state, else the guest's, else lost with the reason.
    fn session_info(&self, row: &SessionRow, vm: &VmRow, live: Option<&GuestSessionStatus>) -> SessionInfo {
        let status = row.final_status.clone().or_else(|| live.cloned());
        let lost_reason = match (&status, vm.state) {
            (Some(s), _) => s.lost_reason.clone(),
            (None, VmState::Running) => Some("the guest has no record of this session".to_string()),
            (None, state) => Some(format!("VM {} is {}", vm.name, state.as_str())),
        };
        let s = status.as_ref();
        SessionInfo {
            id: row.id.clone(),
            name: row.name.clone(),
            vm: vm.name.clone(),
            vm_id: vm.id.clone(),
            command: row.command.clone(),
            cwd: row.cwd.clone(),
            env: row.env.clone(),
            state: s.map(|s| s.state).unwrap_or(SessionState::Lost),
            exit_code: s.and_then(|s| s.exit_code),
            signal: s.and_then(|s| s.signal),
            lost_reason,
            created_at: row.created_at,
            started_at_ms: s.map(|s| s.started_at_ms),
            ended_at_ms: s.and_then(|s| s.ended_at_ms),
            runtime_ms: s.map(|s| s.runtime_ms),
            program: s.map(|s| s.program.clone()),
            pid: s.and_then(|s| s.pid),
            output_bytes: s.map(|s| s.output_bytes).unwrap_or(0),
            stdin_open: s.is_some_and(|s| s.stdin_open && !s.state.is_final()),
            attached: self.attachments.is_attached(&row.id),
        }
    }

    /// One session's info, asking the guest when the VM runs and the session has no final state.
    async fn session_info_live(&self, row: &SessionRow, vm: &VmRow) -> Result<SessionInfo, ApiError> {
        let live = if row.final_status.is_none() && vm.state == VmState::Running {
            self.guest_sessions(vm).await?.remove(&row.id)
        } else {
            None
        };
        Ok(self.session_info(row, vm, live.as_ref()))
    }

    pub async fn session_start(
        self: &Arc<Self>,
        p: SessionStartParams,
        ctx: CallContext,
    ) -> Result<SessionStartResult, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let vm = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&vm).await?;
        let taken = || {
            ApiError::new(
                ErrorCode::AlreadyExists,
                format!("VM {} already has a session named `{}`", vm.name, p.name.as_deref().unwrap_or("")),
            )
            .with_hint("choose another name, or use the existing session")
            .with_next("session.list", json!({"vm": vm.name}), "lists the VM's sessions")
        };
        if p.name.is_some() && self.store.sessions().await?.iter().any(|s| s.vm_id == vm.id && s.name == p.name) {
            return Err(taken());
        }
        let row = SessionRow {
            id: hex::encode(rand::random::<[u8; 4]>()),
            vm_id: vm.id.clone(),
            name: p.name.clone(),
            command: p.command.clone(),
            cwd: p.cwd.clone().unwrap_or_else(|| "/root".into()),
            env: p.env.clone(),
            created_at: now(),
            final_status: None,
        };
        if let Err(e) = self.store.insert_session(row.clone()).await {
            // The unique index is the backstop for two starts racing for one name (or one random id).
            return Err(if is_unique_violation(&e) { taken() } else { e.into() });
        }
        let spec = GuestSessionSpec {
            id: row.id.clone(),
            argv: row.command.clone(),
            env: row.env.clone(),
            cwd: row.cwd.clone(),
        };
        let started = match conn.request(&GuestRequest::SessionStart(spec), Duration::from_secs(15), &ctx.cancel).await
        {
            Ok(GuestResponse::SessionStatus(s)) => Ok(s),
            Ok(other) => Err(guest_error(&vm.name, GuestError::protocol(format!("{other:?}")))),
            Err(e) => Err(guest_error(&vm.name, e)),
        };
        let status = match started {
            Ok(status) => status,
            Err(e) => {
                // Nothing runs in the guest: forget the record so the name is free again.
                self.store.delete_session(row.id.clone()).await?;
                return Err(e);
            }
        };
        tracing::info!(vm = %vm.name, session = %row.id, program = %status.program, "session started");
        if p.input.is_some() || p.eof {
            let input = p.input.as_deref().unwrap_or("").as_bytes();
            if let Err(e) = conn.session_send(&row.id, input, p.eof, &ctx.cancel).await {
                // The session was started for this input: without it, it is undone, not left half-fed.
                let kill = GuestRequest::SessionSignal { id: row.id.clone(), signal: libc::SIGKILL, grace_ms: 0 };
                let _ = conn.request(&kill, Duration::from_secs(20), &CancellationToken::new()).await;
                self.store.delete_session(row.id.clone()).await?;
                let mut e = guest_error(&vm.name, e);
                e.message =
                    format!("writing the input of session `{}`: {}; the session was stopped", label(&row), e.message);
                return Err(e);
            }
        }
        let (output, status) = match p.wait_ms {
            Some(wait_ms) => {
                let (logs, status) = self.read_logs(&conn, &row, &vm, 0, DEFAULT_LOGS_LIMIT, wait_ms, &ctx).await?;
                (Some(logs), status)
            }
            None => (None, status),
        };
        Ok(SessionStartResult { session: self.session_info(&row, &vm, Some(&status)), output })
    }

    pub async fn session_send(
        self: &Arc<Self>,
        p: SessionSendParams,
        ctx: CallContext,
    ) -> Result<SessionSendResult, ApiError> {
        use base64::Engine as _;
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let data = match p.encoding.unwrap_or(ContentEncoding::Text) {
            ContentEncoding::Text => p.data.into_bytes(),
            ContentEncoding::Base64 => {
                base64::engine::general_purpose::STANDARD.decode(p.data.as_bytes()).map_err(|e| {
                    ApiError::invalid(format!("data is not valid base64: {e}"))
                        .with_hint("send text as it is, or base64 of the bytes with encoding: base64")
                })?
            }
        };
        if data.len() as u64 > MAX_SEND_BYTES {
            return Err(ApiError::invalid(format!("data is {} bytes; at most {MAX_SEND_BYTES} per send", data.len()))
                .with_hint("split the input into several sends"));
        }
        let (row, vm) = self.resolve_session(&p.session, p.vm.as_deref()).await?;
        if let Some(done) = &row.final_status {
            return Err(ended_error(&row, &vm, done));
        }
        let conn = self.guest(&vm).await?;
        // Where the log ends before the write (a wait returns what follows it), and a session that is over
        // said as such rather than as a broken pipe.
        let live = self.guest_sessions(&vm).await?.remove(&row.id);
        if let Some(s) = live.as_ref().filter(|s| s.state.is_final()) {
            return Err(ended_error(&row, &vm, s));
        }
        let from = live.map(|s| s.output_bytes).unwrap_or(0);
        let (bytes, stdin_open) = match conn.session_send(&row.id, &data, p.eof, &ctx.cancel).await {
            Ok(sent) => sent,
            Err(e) => {
                // It may have ended between the check and the write.
                let now = self.guest_sessions(&vm).await.ok().and_then(|mut m| m.remove(&row.id));
                if let Some(s) = now.filter(|s| s.state.is_final()) {
                    return Err(ended_error(&row, &vm, &s));
                }
                return Err(guest_error(&vm.name, e));
            }
        };
        let output = match p.wait_ms {
            Some(wait_ms) => Some(self.read_logs(&conn, &row, &vm, from, DEFAULT_LOGS_LIMIT, wait_ms, &ctx).await?.0),
            None => None,
        };
        Ok(SessionSendResult { session: row.id, bytes, stdin_closed: !stdin_open, output })
    }

    pub async fn session_logs(
        self: &Arc<Self>,
        p: SessionLogsParams,
        ctx: CallContext,
    ) -> Result<SessionLogs, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let (row, vm) = self.resolve_session(&p.session, p.vm.as_deref()).await?;
        let conn = self
            .guest(&vm)
            .await
            .map_err(|e| e.with_hint(format!("a session's output lives in its VM: start {} to read it", vm.name)))?;
        let limit = p.limit.unwrap_or(DEFAULT_LOGS_LIMIT);
        let read = self.read_logs(&conn, &row, &vm, p.offset.unwrap_or(0), limit, p.wait_ms.unwrap_or(0), &ctx);
        Ok(read.await?.0)
    }

    /// Reads a session's log from `from` (waiting up to `wait_ms` for something new there), with the state it
    /// was in when the read finished.
    #[allow(clippy::too_many_arguments)]
    async fn read_logs(
        &self,
        conn: &GuestConn,
        row: &SessionRow,
        vm: &VmRow,
        from: u64,
        limit: u64,
        wait_ms: u64,
        ctx: &CallContext,
    ) -> Result<(SessionLogs, GuestSessionStatus), ApiError> {
        let read = tokio::select! {
            r = conn.session_read(&row.id, from, limit, wait_ms, &ctx.cancel) => r,
            _ = ctx.cancel.cancelled() => return Err(ApiError::new(ErrorCode::Cancelled, "cancelled by the caller").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
        }
        .map_err(|e| guest_error(&vm.name, e))?;
        let (chunks, next_offset, status) = chunks(read);
        let info = self.session_info(row, vm, Some(&status));
        let logs = SessionLogs {
            session: row.id.clone(),
            from,
            next_offset,
            size: status.output_bytes,
            more: next_offset < status.output_bytes,
            chunks,
            state: info.state,
            exit_code: info.exit_code,
            signal: info.signal,
        };
        Ok((logs, status))
    }

    pub async fn session_list(self: &Arc<Self>, p: SessionListParams, _: CallContext) -> Result<SessionList, ApiError> {
        let only = match &p.vm {
            Some(v) => Some(self.resolve_vm(v).await?.id),
            None => None,
        };
        let rows: Vec<SessionRow> =
            self.store.sessions().await?.into_iter().filter(|s| only.as_ref().is_none_or(|v| *v == s.vm_id)).collect();
        let mut live_by_vm: HashMap<String, (VmRow, HashMap<String, GuestSessionStatus>)> = HashMap::new();
        let mut sessions = vec![];
        for row in &rows {
            if !live_by_vm.contains_key(&row.vm_id) {
                let Some(vm) = self.store.vm(row.vm_id.clone()).await? else { continue };
                // One guest request per VM; a guest that does not answer leaves its sessions unknown (lost).
                let live = if vm.state == VmState::Running
                    && rows.iter().any(|r| r.vm_id == vm.id && r.final_status.is_none())
                {
                    self.guest_sessions(&vm).await.unwrap_or_default()
                } else {
                    HashMap::new()
                };
                live_by_vm.insert(row.vm_id.clone(), (vm, live));
            }
            let (vm, live) = &live_by_vm[&row.vm_id];
            sessions.push(self.session_info(row, vm, live.get(&row.id)));
        }
        Ok(SessionList { sessions })
    }

    pub async fn session_show(self: &Arc<Self>, p: SessionRef, _: CallContext) -> Result<SessionInfo, ApiError> {
        let (row, vm) = self.resolve_session(&p.session, p.vm.as_deref()).await?;
        self.session_info_live(&row, &vm).await
    }

    pub async fn session_stop(self: &Arc<Self>, p: SessionStopParams, _: CallContext) -> Result<SessionInfo, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let grace = p.grace_secs.unwrap_or(DEFAULT_STOP_GRACE_SECS);
        self.signal_session(&p.session, p.vm.as_deref(), libc::SIGTERM, grace * 1000).await
    }

    pub async fn session_kill(self: &Arc<Self>, p: SessionRef, _: CallContext) -> Result<SessionInfo, ApiError> {
        self.signal_session(&p.session, p.vm.as_deref(), libc::SIGKILL, 0).await
    }

    async fn signal_session(
        &self,
        r: &str,
        vm: Option<&str>,
        signal: i32,
        grace_ms: u64,
    ) -> Result<SessionInfo, ApiError> {
        let (row, vm) = self.resolve_session(r, vm).await?;
        let info = self.session_info_live(&row, &vm).await?;
        if info.state.is_final() {
            return Ok(info);
        }
        let conn = self.guest(&vm).await?;
        let req = GuestRequest::SessionSignal { id: row.id.clone(), signal, grace_ms };
        match conn
            .request(&req, Duration::from_millis(grace_ms) + Duration::from_secs(20), &CancellationToken::new())
            .await
        {
            Ok(GuestResponse::SessionStatus(s)) => Ok(self.session_info(&row, &vm, Some(&s))),
            Ok(other) => Err(guest_error(&vm.name, GuestError::protocol(format!("{other:?}")))),
            Err(e) => Err(guest_error(&vm.name, e)),
        }
    }

    /// Called while a VM is being halted, before its guest goes away: records each open session's last
    /// state, with those still running marked lost because the VM stopped under them.
    pub(crate) async fn record_sessions_at_halt(&self, vm: &VmRow, conn: Option<Arc<GuestConn>>) {
        let Ok(rows) = self.store.sessions().await else { return };
        let open: Vec<SessionRow> = rows.into_iter().filter(|s| s.vm_id == vm.id && s.final_status.is_none()).collect();
        if open.is_empty() {
            return;
        }
        let mut live = HashMap::new();
        // After a daemon restart there may be no connection yet; the guest is still up, so ask it.
        let conn = match conn {
            Some(c) => Some(c),
            None if vm.state == VmState::Running => self.guest(vm).await.ok(),
            None => None,
        };
        if let Some(conn) = conn {
            if let Ok(GuestResponse::Sessions { sessions }) =
                conn.request(&GuestRequest::SessionList, Duration::from_secs(3), &CancellationToken::new()).await
            {
                live = sessions.into_iter().map(|s| (s.id.clone(), s)).collect();
            }
        }
        for row in open {
            let mut status = live.remove(&row.id).unwrap_or_else(|| GuestSessionStatus {
                id: row.id.clone(),
                state: SessionState::Lost,
                exit_code: None,
                signal: None,
                lost_reason: None,
                program: String::new(),
                pid: None,
                started_at_ms: 0,
                ended_at_ms: None,
                runtime_ms: 0,
                output_bytes: 0,
                stdin_open: false,
            });
            if !status.state.is_final() {
                status.state = SessionState::Lost;
                status.lost_reason = Some(format!("VM {} stopped while the session ran", vm.name));
                status.stdin_open = false;
            } else if status.state == SessionState::Lost && status.lost_reason.is_none() {
                status.lost_reason =
                    Some(format!("VM {} stopped; its guest agent did not say how the session ended", vm.name));
            }
            if let Err(e) = self.store.set_session_final(row.id.clone(), Some(status)).await {
                tracing::warn!(session = %row.id, error = %e, "cannot record a session's final state");
            }
        }
    }

    /// Starts following a session's output (and, with `attach`, claims its attachment). Errors come back
    /// before anything is claimed or streamed.
    pub async fn session_follow(
        self: &Arc<Self>,
        p: SessionFollowParams,
        attach: bool,
    ) -> Result<SessionFollower, ApiError> {
        let (row, vm) = self.resolve_session(&p.session, p.vm.as_deref()).await?;
        let info = self.session_info_live(&row, &vm).await?;
        let from = p.from.unwrap_or(info.output_bytes);
        if from > info.output_bytes {
            return Err(ApiError::invalid(format!(
                "from {from} is past the end of the log ({} bytes)",
                info.output_bytes
            ))
            .with_hint("follow from an offset at most the session's output_bytes, or from 0")
            .with_next(
                "session.show",
                json!({"session": label(&row), "vm": vm.name}),
                "shows its output_bytes",
            ));
        }
        if attach && info.state.is_final() {
            return Err(ApiError::precondition(format!("session `{}` {}", label(&row), info.state.as_str()))
                .with_hint("a session that is over cannot be attached; its output stays readable")
                .with_next("session.logs", json!({"session": label(&row), "vm": vm.name}), "reads its output"));
        }
        let claim = if attach { Some(self.attachments.claim(&row.id, label(&row), p.steal)?) } else { None };
        Ok(SessionFollower {
            engine: self.clone(),
            row,
            vm,
            offset: from,
            claim,
            pending: VecDeque::new(),
            done: false,
        })
    }
}

/// A live follow of one session: `next` yields output in log order, then `Ended` (or `Detached`).
pub struct SessionFollower {
    engine: Arc<Engine>,
    row: SessionRow,
    vm: VmRow,
    offset: u64,
    claim: Option<AttachClaim>,
    pending: VecDeque<SessionEvent>,
    done: bool,
}

impl SessionFollower {
    pub fn session_id(&self) -> &str {
        &self.row.id
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            let stolen = self.claim.as_ref().map(|c| c.stolen.clone()).unwrap_or_default();
            tokio::select! {
                _ = stolen.cancelled() => {
                    self.done = true;
                    return Some(SessionEvent::Detached { reason: "another client attached with steal".into() });
                }
                _ = self.read_once() => {}
            }
        }
    }

    async fn read_once(&mut self) {
        let engine = self.engine.clone();
        let vm = match engine.store.vm(self.vm.id.clone()).await {
            Ok(Some(vm)) => vm,
            _ => return self.end(None).await,
        };
        self.vm = vm.clone();
        if vm.state != VmState::Running {
            return self.end(None).await;
        }
        let conn = match engine.guest(&vm).await {
            Ok(c) => c,
            Err(_) => return tokio::time::sleep(Duration::from_millis(500)).await,
        };
        match conn
            .session_read(&self.row.id, self.offset, FOLLOW_READ_LIMIT, FOLLOW_WAIT_MS, &CancellationToken::new())
            .await
        {
            Ok(read) => {
                let (chunks, next, status) = chunks(read);
                self.offset = next;
                self.pending.extend(chunks.into_iter().map(SessionEvent::Output));
                if status.state.is_final() && next >= status.output_bytes {
                    self.end(Some(status)).await;
                }
            }
            Err(GuestError::Agent { message: m, .. }) => {
                tracing::warn!(session = %self.row.id, error = %m, "following a session");
                self.end(None).await
            }
            // The channel broke or the VM is going down: look again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    async fn end(&mut self, status: Option<GuestSessionStatus>) {
        let row = match self.engine.store.sessions().await {
            Ok(rows) => rows.into_iter().find(|r| r.id == self.row.id).unwrap_or_else(|| self.row.clone()),
            Err(_) => self.row.clone(),
        };
        let session = self.engine.session_info(&row, &self.vm, status.as_ref());
        self.pending.push_back(SessionEvent::Ended { session: Box::new(session) });
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_attacher_at_a_time_and_a_steal_hands_over_cleanly() {
        let a = Attachments::default();
        let first = a.claim("s1", "s1", false).unwrap();
        let busy = a.claim("s1", "agent", false).err().unwrap();
        assert_eq!((busy.code, busy.message.as_str()), (ErrorCode::Busy, "session `agent` is already attached"));
        drop(a.claim("s2", "s2", false).expect("other sessions are independent"));
        let second = a.claim("s1", "s1", true).unwrap();
        assert!(first.stolen.is_cancelled(), "the holder is told");
        // The old holder leaving must not release the new holder's claim.
        drop(first);
        assert!(a.is_attached("s1"));
        assert_eq!(a.claim("s1", "s1", false).err().unwrap().code, ErrorCode::Busy);
        drop(second);
        assert!(!a.is_attached("s1"), "released when the attacher goes away");
        assert!(a.claim("s1", "s1", false).is_ok());
    }

    #[test]
    fn output_that_is_not_utf8_travels_as_base64() {
        let c = chunk(FrameKind::Stderr, 7, vec![0xff, b'a']);
        assert_eq!((c.stream, c.offset, c.encoding), (OutputStream::Stderr, 7, ContentEncoding::Base64));
        assert_eq!(c.data, "/2E=");
        let c = chunk(FrameKind::Stdout, 0, b"hi\n".to_vec());
        assert_eq!((c.data.as_str(), c.encoding), ("hi\n", ContentEncoding::Text));
    }
}
