//! Pipe-mode sessions: long-lived commands the agent owns, so they outlive any host connection.
//!
//! Each session has a directory under `/var/lib/banger/sessions/<id>/`:
//! - `output`: stdout and stderr bytes in arrival order (the cursor is a byte offset into this file);
//! - `index`: one 13-byte record per chunk (offset u64 BE, length u32 BE, stream u8: 1 stdout, 2 stderr),
//!   so a read from any offset can label every byte with its stream;
//! - `state.json`: the `GuestSessionStatus`, rewritten (atomically) at start and end.
//!
//! One writer task per session appends output and index; readers only see bytes the writer has finished
//! (the in-memory size moves after the write). Sends take the session's stdin lock and write the whole
//! message before releasing it, so messages never interleave whatever their size (no reliance on PIPE_BUF).
//! The session map is filled once at start-up and then only under its lock by `start`, which checks,
//! spawns and inserts in one critical section.
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tools_schema::guest::{Frame, FrameKind, GuestErrorKind as Kind, MAX_PAYLOAD};
use tools_schema::session::{GuestSessionSpec, GuestSessionStatus, SessionState};

use crate::channel::Failure;

pub const SESSIONS_DIR: &str = "/var/lib/banger/sessions";
const INDEX_RECORD: usize = 13;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
/// How long the end of a session waits for output still in its pipes (a background child may hold them).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy)]
struct IndexEntry {
    offset: u64,
    len: u32,
    stream: u8,
}

pub struct Sessions {
    dir: PathBuf,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

struct Session {
    dir: PathBuf,
    /// Held for a whole message; `None` once closed.
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    status: Mutex<GuestSessionStatus>,
    index: Mutex<Vec<IndexEntry>>,
    /// Bumped after every output write and at the end.
    changed: watch::Sender<u64>,
    started: Option<Instant>,
    pgid: Option<Pid>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Sessions {
    /// Loads the sessions earlier agents left. Any still marked running belonged to an agent that is gone
    /// (restarted, or the guest rebooted): nobody can see its end any more, so it is reported as lost.
    pub fn load(dir: &Path) -> Arc<Sessions> {
        let mut map = HashMap::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Some(mut status) = std::fs::read(path.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<GuestSessionStatus>(&b).ok())
            else {
                continue;
            };
            status.output_bytes = std::fs::metadata(path.join("output")).map(|m| m.len()).unwrap_or(0);
            if status.state == SessionState::Running {
                status.state = SessionState::Lost;
                status.stdin_open = false;
                status.lost_reason =
                    Some("the guest agent restarted (or the guest rebooted) while the session ran".into());
                let _ = write_state(&path, &status);
            }
            let index = read_index(&path.join("index"), status.output_bytes);
            let session = Session {
                dir: path,
                stdin: tokio::sync::Mutex::new(None),
                status: Mutex::new(status.clone()),
                index: Mutex::new(index),
                changed: watch::channel(0).0,
                started: None,
                pgid: None,
            };
            map.insert(status.id.clone(), Arc::new(session));
        }
        Arc::new(Sessions { dir: dir.to_path_buf(), map: Mutex::new(map) })
    }

    fn get(&self, id: &str) -> Result<Arc<Session>, Failure> {
        let missing = || Failure::new(Kind::NotFound, format!("no session `{id}` in the guest"));
        self.map.lock().unwrap().get(id).cloned().ok_or_else(missing)
    }

    pub fn list(&self) -> Vec<GuestSessionStatus> {
        let sessions: Vec<Arc<Session>> = self.map.lock().unwrap().values().cloned().collect();
        let mut out: Vec<GuestSessionStatus> = sessions.iter().map(|s| s.status()).collect();
        out.sort_by_key(|s| s.started_at_ms);
        out
    }

    /// Checks cwd and program, spawns the command and starts its output writer.
    pub fn start(self: &Arc<Self>, spec: GuestSessionSpec) -> Result<GuestSessionStatus, Failure> {
        if spec.id.is_empty() || !spec.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Failure::new(Kind::Invalid, format!("session id `{}` is invalid", spec.id)));
        }
        let mut map = self.map.lock().unwrap();
        if map.contains_key(&spec.id) {
            return Err(Failure::new(Kind::Other, format!("session `{}` already exists in the guest", spec.id)));
        }
        let path_var = spec.env.get("PATH").map(String::as_str).unwrap_or(crate::exec::DEFAULT_PATH);
        let program = crate::exec::preflight(&spec.cwd, &spec.argv[0], path_var)?;
        let dir = self.dir.join(&spec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Failure::new(Kind::Other, format!("creating {}: {e}", dir.display())))?;
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(name))
                .map_err(|e| Failure::new(Kind::Other, format!("creating {}/{name}: {e}", dir.display())))
        };
        let (output, index_file) = (open("output")?, open("index")?);
        let mut cmd = Command::new(&program);
        cmd.arg0(&spec.argv[0])
            .args(&spec.argv[1..])
            .env_clear()
            .env("PATH", crate::exec::DEFAULT_PATH)
            .env("HOME", "/root")
            .env("USER", "root")
            .env("LANG", "C.UTF-8")
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so stop and kill reach everything it started.
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Failure::new(
                    Kind::CannotRun,
                    format!("cannot start `{}` in {}: {e}", spec.argv[0], spec.cwd),
                ));
            }
        };
        let pid = child.id();
        let status = GuestSessionStatus {
            id: spec.id.clone(),
            state: SessionState::Running,
            exit_code: None,
            signal: None,
            lost_reason: None,
            program: program.display().to_string(),
            pid,
            started_at_ms: now_ms(),
            ended_at_ms: None,
            runtime_ms: 0,
            output_bytes: 0,
            stdin_open: true,
        };
        let _ = write_state(&dir, &status);
        let session = Arc::new(Session {
            dir,
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            status: Mutex::new(status),
            index: Mutex::new(vec![]),
            changed: watch::channel(0).0,
            started: Some(Instant::now()),
            pgid: pid.map(|p| Pid::from_raw(p as i32)),
        });
        map.insert(spec.id.clone(), session.clone());
        drop(map);

        let (chunks_tx, chunks_rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
        tokio::spawn(pump(child.stdout.take().expect("piped"), STDOUT, chunks_tx.clone()));
        tokio::spawn(pump(child.stderr.take().expect("piped"), STDERR, chunks_tx));
        let writer = tokio::spawn(write_output(session.clone(), output, index_file, chunks_rx));
        let s = session.clone();
        tokio::spawn(async move {
            let exit = child.wait().await;
            let _ = tokio::time::timeout(DRAIN_GRACE, writer).await;
            s.finish(exit);
        });
        Ok(session.status())
    }

    /// Writes one whole message to a session's stdin.
    pub async fn send(&self, id: &str, data: Vec<u8>, eof: bool) -> Result<(u64, bool), Failure> {
        let s = self.get(id)?;
        let mut stdin = s.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            let state = s.status().state;
            return Err(Failure::new(
                Kind::InputClosed,
                if state.is_final() {
                    format!("session {id} is {}: it no longer reads input", state.as_str())
                } else {
                    format!("the stdin of session {id} is closed (an earlier send had eof)")
                },
            ));
        };
        if let Err(e) = pipe.write_all(&data).await.and(pipe.flush().await) {
            *stdin = None;
            s.status.lock().unwrap().stdin_open = false;
            return Err(Failure::new(Kind::InputClosed, format!("session {id} stopped reading its stdin ({e})")));
        }
        if eof {
            *stdin = None;
            s.status.lock().unwrap().stdin_open = false;
        }
        Ok((data.len() as u64, stdin.is_some()))
    }

    /// Sends log bytes `[offset, offset+limit)` as Stdout/Stderr frames, waiting up to `wait_ms` for
    /// output past `offset` first. Returns the status as of the read.
    pub async fn read(
        &self,
        id: &str,
        offset: u64,
        limit: u64,
        wait_ms: u64,
        stream: u32,
        out: &mpsc::UnboundedSender<Frame>,
    ) -> Result<GuestSessionStatus, Failure> {
        let s = self.get(id)?;
        let mut changes = s.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let st = s.status();
            if offset > st.output_bytes {
                let past = format!("offset {offset} is past the end of the log ({} bytes)", st.output_bytes);
                return Err(Failure::new(Kind::BadOffset, past));
            }
            if offset < st.output_bytes || st.state.is_final() || wait_ms == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                break;
            }
        }
        // The size read here is final for this call: the writer moves it only after writing.
        let status = s.status();
        let end = status.output_bytes.min(offset.saturating_add(limit));
        if end > offset {
            let file = std::fs::File::open(s.dir.join("output"))
                .map_err(|e| Failure::new(Kind::Other, format!("opening the log: {e}")))?;
            let mut data = vec![0u8; (end - offset) as usize];
            file.read_exact_at(&mut data, offset)
                .map_err(|e| Failure::new(Kind::Other, format!("reading the log: {e}")))?;
            for (kind, range) in label(&s.index.lock().unwrap(), offset, end) {
                let bytes = &data[(range.0 - offset) as usize..(range.1 - offset) as usize];
                for piece in bytes.chunks(MAX_PAYLOAD) {
                    let kind = if kind == STDERR { FrameKind::Stderr } else { FrameKind::Stdout };
                    let _ = out.send(Frame::new(kind, stream, piece.to_vec()));
                }
            }
        }
        Ok(status)
    }

    /// Sends `signal` to the session's process group; SIGKILL after `grace_ms` if it still runs. Waits for
    /// the end and returns the final status.
    pub async fn signal(&self, id: &str, signal: i32, grace_ms: u64) -> Result<GuestSessionStatus, Failure> {
        let s = self.get(id)?;
        let signal =
            Signal::try_from(signal).map_err(|_| Failure::new(Kind::Invalid, format!("{signal} is not a signal")))?;
        if s.status().state.is_final() {
            return Ok(s.status());
        }
        let Some(pgid) = s.pgid else { return Ok(s.status()) };
        let _ = killpg(pgid, signal);
        if !s.wait_end(Duration::from_millis(grace_ms)).await {
            let _ = killpg(pgid, Signal::SIGKILL);
            if !s.wait_end(Duration::from_secs(10)).await {
                return Err(Failure::new(Kind::Other, format!("session {id} did not end 10 s after SIGKILL")));
            }
        }
        Ok(s.status())
    }
}

impl Session {
    /// Waits up to `limit` for the session to end; true once it has.
    async fn wait_end(&self, limit: Duration) -> bool {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        while !self.status().state.is_final() {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return false;
            }
        }
        true
    }

    fn status(&self) -> GuestSessionStatus {
        let mut st = self.status.lock().unwrap().clone();
        if let (SessionState::Running, Some(started)) = (st.state, self.started) {
            st.runtime_ms = started.elapsed().as_millis() as u64;
        }
        st
    }

    fn finish(&self, exit: std::io::Result<std::process::ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let snapshot = {
            let mut st = self.status.lock().unwrap();
            match exit {
                Ok(e) if e.code().is_some() => {
                    st.state = SessionState::Exited;
                    st.exit_code = e.code();
                }
                Ok(e) => {
                    st.state = SessionState::Killed;
                    st.signal = e.signal();
                }
                Err(e) => {
                    st.state = SessionState::Lost;
                    st.lost_reason = Some(format!("waiting for the process failed: {e}"));
                }
            }
            st.ended_at_ms = Some(now_ms());
            st.runtime_ms = self.started.map(|s| s.elapsed().as_millis() as u64).unwrap_or(0);
            st.stdin_open = false;
            st.clone()
        };
        if let Err(e) = write_state(&self.dir, &snapshot) {
            eprintln!("banger-agent: saving session {} state: {e}", snapshot.id);
        }
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Splits `[from, to)` into runs of one stream, using the chunk index.
fn label(index: &[IndexEntry], from: u64, to: u64) -> Vec<(u8, (u64, u64))> {
    let mut out: Vec<(u8, (u64, u64))> = vec![];
    let first = index.partition_point(|e| e.offset + e.len as u64 <= from);
    for e in &index[first..] {
        if e.offset >= to {
            break;
        }
        let (a, b) = (e.offset.max(from), (e.offset + e.len as u64).min(to));
        match out.last_mut() {
            Some((kind, range)) if *kind == e.stream && range.1 == a => range.1 = b,
            _ => out.push((e.stream, (a, b))),
        }
    }
    out
}

fn read_index(path: &Path, size: u64) -> Vec<IndexEntry> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes
        .chunks_exact(INDEX_RECORD)
        .map(|r| IndexEntry {
            offset: u64::from_be_bytes(r[..8].try_into().unwrap()),
            len: u32::from_be_bytes(r[8..12].try_into().unwrap()),
            stream: r[12],
        })
        // A record for bytes that never reached the log (the agent died between the two writes).
        .filter(|e| e.offset + e.len as u64 <= size)
        .collect()
}

fn write_state(dir: &Path, status: &GuestSessionStatus) -> std::io::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status).expect("status serialises"))?;
    std::fs::rename(tmp, dir.join("state.json"))
}

async fn pump(mut r: impl AsyncRead + Unpin, stream: u8, tx: mpsc::Sender<(u8, Vec<u8>)>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The session's only log writer: output bytes first, then their index record, then the visible size.
async fn write_output(
    s: Arc<Session>,
    mut output: std::fs::File,
    mut index: std::fs::File,
    mut chunks: mpsc::Receiver<(u8, Vec<u8>)>,
) {
    while let Some((stream, data)) = chunks.recv().await {
        let offset = s.status.lock().unwrap().output_bytes;
        let mut record = Vec::with_capacity(INDEX_RECORD);
        record.extend_from_slice(&offset.to_be_bytes());
        record.extend_from_slice(&(data.len() as u32).to_be_bytes());
        record.push(stream);
        if let Err(e) = output.write_all(&data).and_then(|_| index.write_all(&record)) {
            eprintln!("banger-agent: writing session log: {e}");
            continue;
        }
        s.index.lock().unwrap().push(IndexEntry { offset, len: data.len() as u32, stream });
        s.status.lock().unwrap().output_bytes = offset + data.len() as u64;
        s.changed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_split_and_merge_by_stream() {
        let idx = [
            IndexEntry { offset: 0, len: 4, stream: STDOUT },
            IndexEntry { offset: 4, len: 2, stream: STDOUT },
            IndexEntry { offset: 6, len: 3, stream: STDERR },
            IndexEntry { offset: 9, len: 5, stream: STDOUT },
        ];
        assert_eq!(label(&idx, 0, 14), vec![(STDOUT, (0, 6)), (STDERR, (6, 9)), (STDOUT, (9, 14))]);
        assert_eq!(label(&idx, 5, 10), vec![(STDOUT, (5, 6)), (STDERR, (6, 9)), (STDOUT, (9, 10))]);
        assert_eq!(label(&idx, 7, 8), vec![(STDERR, (7, 8))]);
    }
}
