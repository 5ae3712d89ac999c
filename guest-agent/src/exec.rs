//! Running a program for the host: streamed stdout/stderr, stdin from the host, timeout and cancel.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tools_schema::guest::{ExecSpec, ExitStatus, Frame, FrameKind, GuestErrorKind, GuestResponse};

use crate::channel::{respond, Failure};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CHUNK: usize = 64 * 1024;

/// Where the program is: a path (relative to cwd) or a name on PATH. Errors say exactly which is wrong, by
/// kind (`ProgramMissing` or `CwdMissing`) and in words naming it.
pub fn preflight(cwd: &str, program: &str, path_var: &str) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::PermissionsExt;
    let no_dir = |message: String| Failure::new(GuestErrorKind::CwdMissing, message);
    let no_program = |message: String| Failure::new(GuestErrorKind::ProgramMissing, message);
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(no_dir(format!("working directory {cwd} is not a directory in the guest"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(no_dir(format!("working directory {cwd} does not exist in the guest")))
        }
        Err(e) => return Err(no_dir(format!("working directory {cwd}: {e}"))),
    }
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let path = Path::new(cwd).join(program);
        return match std::fs::metadata(&path) {
            Err(_) => Err(no_program(format!("command `{program}` does not exist in the guest"))),
            Ok(_) if !executable(&path) => Err(no_program(format!("command `{program}` is not an executable file"))),
            Ok(_) => Ok(path),
        };
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| no_program(format!("command `{program}` was not found on the guest's PATH ({path_var})")))
}

pub enum ExecInput {
    Data(Vec<u8>),
    Eof,
    Cancel,
}

pub async fn run(
    stream: u32,
    spec: ExecSpec,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    out: mpsc::UnboundedSender<Frame>,
) {
    let started = Instant::now();
    let cwd = spec.cwd.as_deref().unwrap_or("/root");
    let path_var = spec.env.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH);
    if let Err(f) = preflight(cwd, &spec.argv[0], path_var) {
        respond(&out, stream, GuestResponse::error(f.kind, f.message));
        return;
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LANG", "C.UTF-8")
        .envs(&spec.env)
        .current_dir(cwd)
        .stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so a timeout or cancel ends everything the command started.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            respond(
                &out,
                stream,
                GuestResponse::error(GuestErrorKind::CannotRun, format!("cannot run `{}` in {cwd}: {e}", spec.argv[0])),
            );
            return;
        }
    };
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let stdout = tokio::spawn(pump(child.stdout.take().unwrap(), FrameKind::Stdout, stream, out.clone()));
    let stderr = tokio::spawn(pump(child.stderr.take().unwrap(), FrameKind::Stderr, stream, out.clone()));
    let mut stdin = child.stdin.take();
    let deadline = spec.timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let kill_group = || {
        if let Some(pg) = pgid {
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let mut timed_out = false;
    let mut input_open = true;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            msg = input.recv(), if input_open => match msg {
                Some(ExecInput::Data(d)) => {
                    if let Some(w) = stdin.as_mut() {
                        // A program that closed its stdin early is not an error of ours.
                        if w.write_all(&d).await.is_err() { stdin = None; }
                    }
                }
                Some(ExecInput::Eof) => stdin = None,
                Some(ExecInput::Cancel) | None => { input_open = false; kill_group(); }
            },
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() && !timed_out => {
                timed_out = true;
                kill_group();
            }
        }
    };
    // Output still buffered in the pipes belongs to the command. A background process that inherited the
    // pipes may hold them open for ever, so give the readers a short grace and then move on.
    for pump in [stdout, stderr] {
        let _ = tokio::time::timeout(Duration::from_millis(500), pump).await;
    }
    let response = match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            GuestResponse::Exited(ExitStatus {
                code: st.code(),
                signal: st.signal(),
                timed_out,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
        Err(e) => GuestResponse::error(GuestErrorKind::Other, format!("waiting for `{}`: {e}", spec.argv[0])),
    };
    respond(&out, stream, response);
}

async fn pump(mut r: impl AsyncRead + Unpin, kind: FrameKind, stream: u32, out: mpsc::UnboundedSender<Frame>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send(Frame::new(kind, stream, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_names_what_is_wrong() {
        let e = preflight("/nonexistent-dir", "sh", "/bin").unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::CwdMissing);
        let e = e.message;
        assert!(e.contains("working directory /nonexistent-dir does not exist"), "{e}");
        let e = preflight("/", "no-such-program-xyz", "/bin:/usr/bin").unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::ProgramMissing);
        let e = e.message;
        assert!(e.contains("`no-such-program-xyz` was not found on the guest's PATH"), "{e}");
        let plain = std::env::temp_dir().join(format!("banger-preflight-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        std::fs::set_permissions(&plain, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644))
            .unwrap();
        let e = preflight("/", plain.to_str().unwrap(), "/bin").unwrap_err();
        let _ = std::fs::remove_file(&plain);
        assert_eq!(e.kind, GuestErrorKind::ProgramMissing);
        let e = e.message;
        assert!(e.contains("not an executable"), "{e}");
        assert_eq!(preflight("/", "sh", "/nope:/bin").unwrap(), PathBuf::from("/bin/sh"));
    }
}
