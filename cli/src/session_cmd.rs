//! `banger vm session ...`: pipe-mode sessions (start, send, attach, logs, list, show, stop, kill).
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Args, Subcommand};
use tokio::io::AsyncReadExt;
use tools_schema::ops;
use tools_schema::session::{
    OutputChunk, OutputStream, SessionEvent, SessionFollowParams, SessionInfo, SessionListParams, SessionLogsParams,
    SessionRef, SessionSendParams, SessionStartParams, SessionState, SessionStopParams,
};
use tools_schema::vm::ContentEncoding;

use crate::client::{CallError, Daemon};
use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum SessionCmd {
    /// Start a long-lived command in a VM, with a stdin pipe and a replayable output log.
    #[command(
        after_help = "Examples:\n  banger vm session start dev --name agent --cwd /root/app -- python3 -u agent.py\n  banger vm session start dev --env MODE=rpc -- sh -c 'while read l; do echo \"got $l\"; done'"
    )]
    Start(StartArgs),
    /// Write to a session's stdin without attaching: DATA (plus a newline unless --raw), --file, or this
    /// command's stdin. One send is written whole; concurrent sends never interleave.
    #[command(
        after_help = "Examples:\n  banger vm session send agent '{\"type\":\"prompt\"}'\n  banger vm session send agent --file input.jsonl\n  printf 'a\\nb\\n' | banger vm session send agent"
    )]
    Send(SendArgs),
    /// Attach: this command's stdin goes to the session (line by line), the session's stdout to stdout and
    /// stderr to stderr. End of input or Ctrl-C detaches and leaves the session running (--eof instead
    /// closes the session's stdin and waits for it to end). One attacher at a time.
    #[command(
        after_help = "Examples:\n  banger vm session attach agent\n  banger vm session attach agent --replay\n  my-orchestrator | banger vm session attach agent --eof | tee out.jsonl"
    )]
    Attach(AttachArgs),
    /// Print a session's output from a byte offset (stdout to stdout, stderr to stderr); --follow keeps
    /// printing until it ends.
    #[command(
        after_help = "Examples:\n  banger vm session logs agent\n  banger vm session logs agent --from 4096 --follow"
    )]
    Logs(LogsArgs),
    /// List sessions (of one VM, or of all).
    #[command(after_help = "Example:\n  banger vm session list dev")]
    List { vm: Option<String> },
    /// Show one session: state, exit code or signal, timings, program and pid.
    #[command(after_help = "Example:\n  banger vm session show agent --json")]
    Show(RefArgs),
    /// Stop a session: SIGTERM to its process group, SIGKILL after the grace period.
    #[command(after_help = "Example:\n  banger vm session stop agent --grace 10")]
    Stop {
        #[command(flatten)]
        r: RefArgs,
        /// Seconds between SIGTERM and SIGKILL (default 5).
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Kill a session's process group at once (SIGKILL).
    #[command(after_help = "Example:\n  banger vm session kill agent")]
    Kill(RefArgs),
}

#[derive(Args)]
pub struct RefArgs {
    /// Session id, id prefix or name.
    session: String,
    /// The session's VM (needed when several VMs have a session of that name).
    #[arg(long)]
    vm: Option<String>,
}

#[derive(Args)]
pub struct StartArgs {
    vm: String,
    /// Session name, unique in the VM.
    #[arg(long)]
    name: Option<String>,
    /// Working directory in the guest (default /root).
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = crate::args::parse_env)]
    env: Vec<(String, String)>,
    /// Text for its stdin once it runs (a newline is added).
    #[arg(long)]
    input: Option<String>,
    /// Close its stdin after --input (or at once).
    #[arg(long)]
    eof: bool,
    /// Wait up to this many milliseconds for its first output and print it.
    #[arg(long, value_name = "MS")]
    wait_ms: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    r: RefArgs,
    /// Text to send; a newline is added unless --raw.
    data: Option<String>,
    /// Send this file's bytes as they are.
    #[arg(long, conflicts_with = "data")]
    file: Option<std::path::PathBuf>,
    /// Do not add a newline to DATA.
    #[arg(long)]
    raw: bool,
    /// Close the session's stdin after this send.
    #[arg(long)]
    eof: bool,
    /// Wait up to this many milliseconds for the output that follows and print it.
    #[arg(long, value_name = "MS")]
    wait_ms: Option<u64>,
}

#[derive(Args)]
pub struct AttachArgs {
    #[command(flatten)]
    r: RefArgs,
    /// Start with the whole output log (offset 0) instead of only new output.
    #[arg(long)]
    replay: bool,
    /// Take the attachment from another client.
    #[arg(long)]
    steal: bool,
    /// At end of input, close the session's stdin and wait for it to end (exit with its code).
    #[arg(long)]
    eof: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    r: RefArgs,
    /// Byte offset to start from.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Keep printing new output until the session ends (or Ctrl-C).
    #[arg(long)]
    follow: bool,
}

/// A read of a session's output, each chunk to the stream it came from.
fn print_output(logs: &tools_schema::session::SessionLogs) -> std::io::Result<()> {
    use std::io::Write;
    for c in &logs.chunks {
        match c.stream {
            OutputStream::Stdout => std::io::stdout().write_all(&decode(c))?,
            OutputStream::Stderr => std::io::stderr().write_all(&decode(c))?,
        }
    }
    std::io::stdout().flush()
}

fn decode(c: &OutputChunk) -> Vec<u8> {
    match c.encoding {
        ContentEncoding::Text => c.data.clone().into_bytes(),
        ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD.decode(&c.data).unwrap_or_default(),
    }
}

fn print_chunk(c: &OutputChunk) -> std::io::Result<()> {
    let bytes = decode(c);
    match c.stream {
        OutputStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()
        }
        OutputStream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(&bytes)?;
            err.flush()
        }
    }
}

/// Text when it is UTF-8, base64 otherwise.
fn encode(bytes: Vec<u8>) -> (String, Option<ContentEncoding>) {
    match String::from_utf8(bytes) {
        Ok(text) => (text, None),
        Err(e) => (base64::engine::general_purpose::STANDARD.encode(e.as_bytes()), Some(ContentEncoding::Base64)),
    }
}

/// Like a shell: the exit code, 128+signal when killed, 1 when lost.
fn exit_number(s: &SessionInfo) -> i32 {
    let code = match (s.state, s.exit_code, s.signal) {
        (_, Some(c), _) => c,
        (_, None, Some(sig)) => 128 + sig,
        (SessionState::Running, ..) => 0,
        _ => 1,
    };
    code.clamp(0, 255)
}

fn exit_code(s: &SessionInfo) -> ExitCode {
    ExitCode::from(exit_number(s) as u8)
}

fn describe(s: &SessionInfo) -> String {
    let state = match (s.state, s.exit_code, s.signal, &s.lost_reason) {
        (SessionState::Exited, Some(c), ..) => format!("exited {c}"),
        (SessionState::Killed, _, Some(sig), _) => format!("killed by signal {sig}"),
        (SessionState::Lost, _, _, Some(r)) => format!("lost: {r}"),
        (state, ..) => state.as_str().to_string(),
    };
    state
}

fn rows(sessions: &[SessionInfo]) -> Vec<Vec<String>> {
    sessions
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.vm.clone(),
                describe(s),
                format!("{} B", s.output_bytes),
                if s.attached { "yes".into() } else { "no".into() },
                s.command.join(" "),
            ]
        })
        .collect()
}

const HEADER: &[&str] = &["ID", "NAME", "VM", "STATE", "OUTPUT", "ATTACHED", "COMMAND"];

fn print_info(s: &SessionInfo, json: bool) {
    if json {
        output::json(s);
        return;
    }
    output::table(HEADER, &rows(std::slice::from_ref(s)));
    if let Some(p) = &s.program {
        let p = output::term_safe(p);
        println!("  program: {p}  pid: {}", s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()));
    }
    if let Some(ms) = s.runtime_ms {
        println!(
            "  runtime: {:.1}s  cwd: {}  stdin: {}",
            ms as f64 / 1000.0,
            output::term_safe(&s.cwd),
            if s.stdin_open { "open" } else { "closed" }
        );
    }
}

pub async fn run(cmd: SessionCmd, ctx: &Ctx, d: &Daemon) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionCmd::Start(a) => {
            let p = SessionStartParams {
                vm: a.vm,
                name: a.name,
                command: a.command,
                cwd: a.cwd,
                env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
                input: a.input.map(|i| i + "\n"),
                eof: a.eof,
                wait_ms: a.wait_ms,
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            let started = d.call::<ops::SessionStart>(&p).await?;
            if ctx.json {
                output::json(&started);
            } else {
                let s = &started.session;
                let r = s.name.clone().unwrap_or_else(|| s.id.clone());
                println!(
                    "session {} ({}) runs `{}` in {} (pid {})",
                    s.id,
                    r,
                    s.command.join(" "),
                    s.vm,
                    s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                );
                println!("  send input:  banger vm session send {r} 'text'");
                println!("  attach:      banger vm session attach {r}");
                println!("  read output: banger vm session logs {r}");
                if let Some(out) = &started.output {
                    print_output(out)?;
                }
            }
        }
        SessionCmd::Send(a) => {
            let bytes = match (a.data, a.file) {
                (Some(text), _) => {
                    let mut b = text.into_bytes();
                    if !a.raw {
                        b.push(b'\n');
                    }
                    b
                }
                (None, Some(f)) => {
                    std::fs::read(&f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?
                }
                (None, None) => {
                    let mut b = vec![];
                    tokio::io::stdin().read_to_end(&mut b).await?;
                    b
                }
            };
            let (data, encoding) = encode(bytes);
            let p =
                SessionSendParams { session: a.r.session, vm: a.r.vm, data, encoding, eof: a.eof, wait_ms: a.wait_ms };
            let r = d.call::<ops::SessionSend>(&p).await?;
            if ctx.json {
                output::json(&r);
            } else {
                eprintln!(
                    "sent {} bytes to {}{}",
                    r.bytes,
                    r.session,
                    if r.stdin_closed { " (stdin closed)" } else { "" }
                );
                if let Some(out) = &r.output {
                    print_output(out)?;
                }
            }
        }
        SessionCmd::Attach(a) => return attach(ctx, d, a).await,
        SessionCmd::Logs(a) => {
            if a.follow {
                let p = SessionFollowParams { session: a.r.session, vm: a.r.vm, from: Some(a.from), steal: false };
                return stream(d, "session.subscribe", "session.unsubscribe", &p, ctx.json).await;
            }
            let mut from = a.from;
            loop {
                let p = SessionLogsParams {
                    session: a.r.session.clone(),
                    vm: a.r.vm.clone(),
                    offset: Some(from),
                    ..Default::default()
                };
                let logs = d.call::<ops::SessionLogs>(&p).await?;
                if ctx.json {
                    // One read: the caller continues from next_offset.
                    output::json(&logs);
                    break;
                }
                for c in &logs.chunks {
                    print_chunk(c)?;
                }
                from = logs.next_offset;
                if !logs.more {
                    break;
                }
            }
        }
        SessionCmd::List { vm } => {
            let list = d.call::<ops::SessionList>(&SessionListParams { vm }).await?;
            if ctx.json {
                output::json(&list);
            } else {
                output::table(HEADER, &rows(&list.sessions));
            }
        }
        SessionCmd::Show(r) => {
            print_info(&d.call::<ops::SessionShow>(&SessionRef { session: r.session, vm: r.vm }).await?, ctx.json)
        }
        SessionCmd::Stop { r, grace } => {
            let p = SessionStopParams { session: r.session, vm: r.vm, grace_secs: grace };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            print_info(&d.call::<ops::SessionStop>(&p).await?, ctx.json)
        }
        SessionCmd::Kill(r) => {
            print_info(&d.call::<ops::SessionKill>(&SessionRef { session: r.session, vm: r.vm }).await?, ctx.json)
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a subscription's output until the session ends; with `json`, one event per line.
async fn stream(
    d: &Daemon,
    method: &str,
    unsubscribe: &str,
    p: &SessionFollowParams,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut sub = d.subscribe::<SessionEvent>(method, unsubscribe, p).await?;
    loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        };
        let Some(ev) = ev else {
            anyhow::bail!("the daemon connection closed; the session keeps running (follow it again with --from)");
        };
        let ev = ev.map_err(|e| anyhow::anyhow!("bad event from the daemon: {e}"))?;
        if json {
            println!("{}", serde_json::to_string(&ev)?);
        }
        match ev {
            SessionEvent::Output(c) if !json => print_chunk(&c)?,
            SessionEvent::Output(_) => {}
            SessionEvent::Ended { session } => return Ok(exit_code(&session)),
            SessionEvent::Detached { reason } => {
                eprintln!("banger: detached: {}", output::term_line(&reason));
                return Ok(ExitCode::from(1));
            }
        }
    }
}

type Subscription = crate::client::Subscription<SessionEvent>;

/// Connects and claims the attachment from log offset `from`.
async fn subscribe_attach(
    ctx: &Ctx,
    a: &AttachArgs,
    from: u64,
    steal: bool,
) -> Result<(Daemon, Subscription), CallError> {
    let d = ctx.daemon().await?;
    let p = SessionFollowParams { session: a.r.session.clone(), vm: a.r.vm.clone(), from: Some(from), steal };
    let sub = d.subscribe::<SessionEvent>("session.attach", "session.detach", &p).await?;
    Ok((d, sub))
}

/// After the daemon went away (restart, crash): attach again where the output left off. The session
/// never noticed; the daemon keeps no attach state worth restoring (the claim died with the connection).
async fn reattach(ctx: &Ctx, a: &AttachArgs, from: u64) -> anyhow::Result<(Daemon, Subscription)> {
    eprintln!("banger: lost the daemon connection; re-attaching (the session keeps running)");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match subscribe_attach(ctx, a, from, false).await {
            Ok(x) => return Ok(x),
            Err(CallError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The stdio bridge: stdin lines to the session, its output to stdout/stderr. Survives daemon restarts
/// by re-attaching from the last offset it printed.
async fn attach(ctx: &Ctx, d: &Daemon, a: AttachArgs) -> anyhow::Result<ExitCode> {
    let session = a.r.session.clone();
    let info = d.call::<ops::SessionShow>(&SessionRef { session: session.clone(), vm: a.r.vm.clone() }).await?;
    // An explicit cursor from the start, so a re-attach can continue exactly where this one was.
    let mut cursor = if a.replay { 0 } else { info.output_bytes };
    let (mut daemon, mut sub) = subscribe_attach(ctx, &a, cursor, a.steal).await?;
    // Input goes line by line, each line one send, so another sender's message can only fall between lines.
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, bool)>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![];
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    let _ = lines_tx.send((std::mem::take(&mut buf), true)).await;
                    return;
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(last) = buf.iter().rposition(|&b| b == b'\n') {
                        let rest = buf.split_off(last + 1);
                        if lines_tx.send((std::mem::replace(&mut buf, rest), false)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let mut input_open = true;
    let code = loop {
        tokio::select! {
            ev = sub.next() => {
                let Some(ev) = ev else {
                    (daemon, sub) = reattach(ctx, &a, cursor).await?;
                    continue;
                };
                match ev.map_err(|e| anyhow::anyhow!("bad event from the daemon: {e}"))? {
                    SessionEvent::Output(c) => {
                        let bytes = decode(&c);
                        cursor = c.offset + bytes.len() as u64;
                        print_chunk(&c)?
                    }
                    SessionEvent::Ended { session } => break exit_number(&session),
                    SessionEvent::Detached { reason } => {
                        eprintln!("banger: detached: {}", output::term_line(&reason));
                        break 1;
                    }
                }
            }
            line = lines_rx.recv(), if input_open => {
                let Some((bytes, at_eof)) = line else { input_open = false; continue };
                if !bytes.is_empty() || (at_eof && a.eof) {
                    let (data, encoding) = encode(bytes);
                    let p = SessionSendParams {
                        session: session.clone(),
                        vm: a.r.vm.clone(),
                        data,
                        encoding,
                        eof: at_eof && a.eof,
                        wait_ms: None,
                    };
                    loop {
                        match daemon.call::<ops::SessionSend>(&p).await {
                            Ok(_) => break,
                            // The daemon went away. The agent writes a message whole or not at all; if the daemon died after
                            // delivering it, it is delivered twice (at least once, never half).
                            Err(CallError::Unreachable(_)) => (daemon, sub) = reattach(ctx, &a, cursor).await?,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                if at_eof {
                    input_open = false;
                    if !a.eof {
                        break 0; // detach; the session runs on
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break 0,
        }
    };
    drop(sub);
    // The stdin reader may be parked in a blocking read; leave without waiting for it.
    std::io::stdout().flush()?;
    std::process::exit(code)
}
