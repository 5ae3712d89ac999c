//! A minimal QMP client: the JSON-lines control protocol of a QEMU process, used for template snapshots
//! (`migrate` out, `migrate-incoming` in). Events are skipped; each command waits for its own answer.
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's control socket")]
    Connect(#[source] std::io::Error),
    #[error("QEMU's control socket closed")]
    Closed,
    #[error("QEMU refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("QEMU did not answer {command} in time")]
    Timeout { command: String },
    #[error("{0}")]
    Migration(String),
    #[error("creating {path}: {source}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves capabilities negotiation done.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match crate::host::connect_vm_socket(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(QmpError::Connect(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w };
        qmp.read_message().await?; // the greeting
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.map_err(|_| QmpError::Closed)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Closed)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({"execute": command, "arguments": arguments});
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(|_| QmpError::Closed)?;
        self.answer(command).await
    }

    /// Waits for the answer to the command just sent, skipping events.
    async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        let answer = async {
            loop {
                let v = self.read_message().await?;
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(err) = v.get("error") {
                    return Err(QmpError::Refused {
                        command: command.to_string(),
                        message: err.get("desc").and_then(Value::as_str).unwrap_or("error").to_string(),
                    });
                }
                return Ok(v.get("return").cloned().unwrap_or(Value::Null));
            }
        };
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| QmpError::Timeout { command: command.to_string() })?
    }

    /// Polls `query-migrate` until the migration (either direction) completes or fails.
    pub async fn wait_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.execute("query-migrate", json!({})).await?;
            match status.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = status.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(QmpError::Migration(format!("migration failed: {why}")));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout { command: "migrate".into() });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes the paused guest's device state to `file`. Guest RAM lives in a shared file the template
    /// keeps, so `x-ignore-shared` leaves it out of the stream (tens of KiB instead of all of RAM).
    /// The daemon opens the file and hands QEMU the descriptor (`getfd`, then an `fd:` migration): a
    /// sandboxed QEMU may not run `exec:` helpers, and need not see the file's path.
    pub async fn save_state(&mut self, file: &Path) -> Result<(), QmpError> {
        self.execute("stop", json!({})).await?;
        self.ignore_shared().await?;
        // The template's folder is its VMM's to write: whatever it put at this path goes first.
        let out = crate::host_files::create_fresh(file)
            .map_err(|source| QmpError::Create { path: file.to_path_buf(), source })?;
        self.send_fd(MIGRATION_FD, &out).await?;
        self.execute("migrate", json!({"uri": format!("fd:{MIGRATION_FD}")})).await?;
        self.wait_migration(Duration::from_secs(60)).await
    }

    /// Loads device state saved by `save_state` into a QEMU started with `-incoming defer`, and resumes it.
    pub async fn restore_state(&mut self, file: &Path) -> Result<(), QmpError> {
        self.ignore_shared().await?;
        let input =
            std::fs::File::open(file).map_err(|source| QmpError::Create { path: file.to_path_buf(), source })?;
        self.send_fd(MIGRATION_FD, &input).await?;
        self.execute("migrate-incoming", json!({"uri": format!("fd:{MIGRATION_FD}")})).await?;
        self.wait_migration(Duration::from_secs(60)).await?;
        self.execute("cont", json!({})).await?;
        Ok(())
    }

    /// Hands QEMU a descriptor under `name` (QMP `getfd`: the descriptor rides on the command's own bytes).
    async fn send_fd(&mut self, name: &str, file: &std::fs::File) -> Result<(), QmpError> {
        use std::os::fd::AsRawFd;
        let msg = json!({"execute": "getfd", "arguments": {"fdname": name}});
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(b'\n');
        let fds = [file.as_raw_fd()];
        let stream: &UnixStream = self.writer.as_ref();
        loop {
            stream.writable().await.map_err(|_| QmpError::Closed)?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[std::io::IoSlice::new(&bytes)],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == bytes.len() => break,
                Ok(_) => return Err(QmpError::Closed),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(QmpError::Closed),
            }
        }
        self.answer("getfd").await.map(drop)
    }

    async fn ignore_shared(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        )
        .await
        .map(|_| ())
    }
}

/// The name a migration stream's descriptor is given in QEMU (`getfd`).
const MIGRATION_FD: &str = "banger-migration";
