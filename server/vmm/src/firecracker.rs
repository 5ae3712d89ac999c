//! Firecracker driver: process + REST API over its Unix socket (hyper 1 client over tokio UnixStream,
//! following Firecracker's swagger; crates.io Firecracker clients are old or immature).
//!
//! The API is small and stable (a handful of PUT/PATCH/GET calls with flat JSON bodies), so a
//! hand-written client keeps us on the hyper version the rest of the daemon already builds, and lets
//! errors carry Firecracker's own `fault_message`, which is what tells an operator what went wrong.
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Name of the API socket inside a VM's directory; fixed so a restarted daemon can find it again.
pub const API_SOCKET_NAME: &str = "firecracker.sock";

/// How long `spawn` waits for the API to answer. Firecracker binds its socket within milliseconds;
/// anything slower means it is stuck or misconfigured, and a VM we cannot talk to is useless.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound for an ordinary API call. The API thread answers configuration calls at once; a call
/// that takes longer means the VMM is wedged, and the caller holds the VM's lock meanwhile.
const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Snapshots write all of guest memory, which for a multi-GiB guest on a slow disk takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum FcError {
    #[error("{marker:?} cannot be a Firecracker instance id (it must be 1-64 characters from A-Z, a-z, 0-9 and '-')")]
    InvalidMarker { marker: String },
    #[error("the API socket path {path:?} is too long for a Unix socket address ({MAX_SOCKET_PATH} bytes at most)")]
    SocketPathTooLong { path: PathBuf },
    #[error("path {path:?} is not UTF-8, which Firecracker's JSON API cannot carry")]
    NonUtf8Path { path: PathBuf },
    #[error("Firecracker takes raw disks only; {path:?} is {format:?}")]
    UnsupportedDiskFormat { path: PathBuf, format: super::DiskFormat },
    #[error("could not start {binary:?}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Firecracker (pid {pid}) exited before its API answered ({status}); its output is in {console_log:?}")]
    ExitedEarly { pid: u32, status: String, console_log: PathBuf },
    #[error("Firecracker (pid {pid}) did not answer on {socket:?} within {waited:?}, so it was killed")]
    ApiSocketTimeout { pid: u32, socket: PathBuf, waited: Duration },
    #[error("Firecracker rejected {method} {path} with status {status}: {body}")]
    Api { method: String, path: String, status: u16, body: String },
    #[error("Firecracker did not answer {method} {path} within {after:?}")]
    Timeout { method: String, path: String, after: Duration },
    #[error("could not build the request {method} {path}")]
    Request {
        method: String,
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("HTTP exchange {method} {path} with Firecracker failed")]
    Http {
        method: String,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("Firecracker answered {method} {path} with a body that is not JSON")]
    BadResponse {
        method: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("i/o error while {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// A running Firecracker process and the socket its API listens on.
#[derive(Debug, Clone)]
pub struct FcMachine {
    pub pid: u32,
    api_socket: PathBuf,
}

/// Everything `configure` sends before `start`. Firecracker only accepts these before boot.
#[derive(Debug, Clone)]
pub struct FcConfig {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Firecracker on x86_64 loads an uncompressed ELF `vmlinux`, not a bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub drives: Vec<FcDrive>,
    /// TAP device name and guest MAC address.
    pub net: Option<(String, String)>,
    /// Guest CID and the host-side Unix socket Firecracker creates for hybrid vsock.
    pub vsock: Option<(u32, PathBuf)>,
}

/// One virtio-block device. Firecracker puts the root drive first (`/dev/vda`) whatever the order given,
/// and adds `root=/dev/vda` (with `ro` for a read-only root) to the kernel command line itself.
#[derive(Debug, Clone)]
pub struct FcDrive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub is_root: bool,
}

impl FcDrive {
    /// Firecracker's view of one of the VM's drives: raw only, read-only exactly when the guest may not write,
    /// and, for a file inside the VM's directory `dir`, its path under `seen` (the anchor a template's
    /// Firecracker sees its directory at; `dir` itself otherwise). The kernel command line names the root
    /// (`RootLayout::kernel_args`), so no drive is Firecracker's root device.
    pub fn of(drive: &super::Drive, dir: &Path, seen: &Path) -> Result<FcDrive, FcError> {
        if drive.format != super::DiskFormat::Raw {
            return Err(FcError::UnsupportedDiskFormat { path: drive.path.clone(), format: drive.format });
        }
        let path = match drive.path.strip_prefix(dir) {
            Ok(inside) => seen.join(inside),
            Err(_) => drive.path.clone(),
        };
        Ok(FcDrive {
            id: drive.id.to_string(),
            path,
            read_only: drive.access == super::DiskAccess::ReadOnly,
            is_root: false,
        })
    }
}

/// Starts `firecracker --api-sock <dir>/firecracker.sock --id <marker>` detached in its own session
/// (setsid in pre_exec; stdin null; stdout+stderr appended to `console_log`, which is where the guest serial
/// console goes), does NOT wait on the child (the daemon reaps VMMs by pid), waits up to 5 s for the API socket
/// to answer `GET /`, and kills the process if it never does. `marker` must appear on the command line (the
/// daemon identifies VMM processes by pid + marker) — `--id` carries it (Firecracker ids allow [A-Za-z0-9-], max 64 chars).
pub async fn spawn(firecracker: &Path, dir: &Path, marker: &str, console_log: &Path) -> Result<FcMachine, FcError> {
    spawn_within(firecracker, dir, marker, console_log, None, SPAWN_TIMEOUT).await
}

/// `spawn`, with the VM's directory also mounted at `anchor` inside a mount namespace of the process's own.
/// A snapshot stores the paths of the files the VM had open (drives, the vsock socket); a template runs with
/// its files under its anchor and each clone gets its own directory mounted there, so the same paths lead
/// every clone to its own files. The API socket is given under the anchor too, and appears in `dir`.
pub async fn spawn_anchored(
    firecracker: &Path,
    dir: &Path,
    anchor: &Path,
    marker: &str,
    console_log: &Path,
) -> Result<FcMachine, FcError> {
    spawn_within(firecracker, dir, marker, console_log, Some(anchor), SPAWN_TIMEOUT).await
}

async fn spawn_within(
    firecracker: &Path,
    dir: &Path,
    marker: &str,
    console_log: &Path,
    anchor: Option<&Path>,
    wait: Duration,
) -> Result<FcMachine, FcError> {
    if !valid_instance_id(marker) {
        return Err(FcError::InvalidMarker { marker: marker.to_string() });
    }
    let api_socket = dir.join(API_SOCKET_NAME);
    if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(FcError::SocketPathTooLong { path: api_socket });
    }
    // Firecracker refuses to start if the socket path exists; a leftover from a dead VMM is stale by
    // definition, because the caller is about to start this VM's only VMM.
    match std::fs::remove_file(&api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(FcError::Io { what: format!("removing the stale socket {api_socket:?}"), source }),
    }
    let log = crate::host_files::open_append(console_log)
        .map_err(|source| FcError::Io { what: format!("opening the console log {console_log:?}"), source })?;
    let log_err = log
        .try_clone()
        .map_err(|source| FcError::Io { what: format!("duplicating the console log {console_log:?}"), source })?;

    // std's Command, not tokio's: a dropped tokio Child is reaped by tokio's orphan queue, which would
    // steal the exit status from the daemon that reaps VMMs by pid (and make pid reuse possible while
    // the daemon still thinks the VM is its).
    let mut cmd = std::process::Command::new(firecracker);
    cmd.arg("--api-sock")
        .arg(anchor.map(|a| a.join(API_SOCKET_NAME)).unwrap_or_else(|| api_socket.clone()))
        .arg("--id")
        .arg(marker)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    // Prepared before the fork: the child may only make syscalls, not allocate.
    let bind = match anchor {
        Some(a) => {
            let c = |p: &Path| {
                std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|_| FcError::NonUtf8Path { path: p.to_path_buf() })
            };
            Some((c(dir)?, c(a)?, c(Path::new("/"))?))
        }
        None => None,
    };
    // SAFETY: setsid, unshare and mount are async-signal-safe syscalls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: the daemon's terminal, process group and signals (Ctrl-C, systemd stop) must
            // not reach the VM, which is meant to outlive the daemon.
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some((from, to, root)) = &bind {
                let none = std::ptr::null();
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(none, root.as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0
                    || libc::mount(from.as_ptr(), to.as_ptr(), none, libc::MS_BIND, std::ptr::null()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| FcError::Spawn { binary: firecracker.to_path_buf(), source })?;
    let pid = child.id();
    tracing::debug!(pid, ?api_socket, "started firecracker");
    // Reaping here is ours to do: the process never became a VM anybody else knows about.
    let exited = || child.try_wait().ok().flatten().map(|status| status.to_string());
    await_api(pid, api_socket, console_log, wait, exited).await
}

/// Starts Firecracker through its jailer (`fc_jail`), in `jail` (built by `Containment::jailer_jail`): the
/// jailer is PID 1 of a PID namespace of its own and execs Firecracker in place, so the pid returned is
/// Firecracker's, the daemon's child like every contained VMM. `api_socket` is where the socket Firecracker
/// makes in the VM's folder appears on the host. The jailer's and Firecracker's output go to `console_log`.
pub async fn spawn_jailed(
    jailer: &Path,
    spec: &crate::fc_jail::JailerSpec<'_>,
    jail: &crate::jail::Jail,
    api_socket: &Path,
    console_log: &Path,
) -> Result<FcMachine, FcError> {
    if !valid_instance_id(spec.id) {
        return Err(FcError::InvalidMarker { marker: spec.id.to_string() });
    }
    if api_socket.as_os_str().len() > MAX_SOCKET_PATH || spec.api_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(FcError::SocketPathTooLong { path: spec.api_socket.to_path_buf() });
    }
    match std::fs::remove_file(api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(FcError::Io { what: format!("removing the stale socket {api_socket:?}"), source }),
    }
    let args = spec.args().map_err(|e| FcError::Io {
        what: "building the jailer's arguments".into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    let log = crate::host_files::open_append(console_log)
        .map_err(|source| FcError::Io { what: format!("opening the console log {console_log:?}"), source })?;
    let program = crate::jail::Program { binary: jailer, args: &args, env: &[], output: &log, fds: &[] };
    let pid = crate::jail::spawn(jail, &program)
        .map_err(|e| FcError::Spawn { binary: jailer.to_path_buf(), source: io::Error::other(e.to_string()) })?;
    tracing::debug!(pid, ?api_socket, "started firecracker through its jailer");
    let exited = || {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status: {code}")),
            Ok(WaitStatus::Signaled(_, signal, _)) => Some(format!("killed by {signal}")),
            _ => None,
        }
    };
    await_api(pid, api_socket.to_path_buf(), console_log, SPAWN_TIMEOUT, exited).await
}

/// Waits for a just-started Firecracker's API to answer; kills it if it never does. `exited` reaps it (it
/// is this process's child) and says how it ended, if it has.
async fn await_api(
    pid: u32,
    api_socket: PathBuf,
    console_log: &Path,
    wait: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<FcMachine, FcError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(status) = exited() {
            return Err(FcError::ExitedEarly { pid, status, console_log: console_log.to_path_buf() });
        }
        if api_socket.exists()
            && call_socket(&api_socket, Method::GET, "/", None, Duration::from_millis(500)).await.is_ok()
        {
            return Ok(FcMachine { pid, api_socket });
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                if exited().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = std::fs::remove_file(&api_socket);
            return Err(FcError::ApiSocketTimeout { pid, socket: api_socket, waited: wait });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Firecracker's own rule for `--id`; checking it here turns its start-up failure into a clear error.
fn valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl FcMachine {
    /// For a VMM this process did not start (after a daemon restart): the socket name is fixed, so the
    /// VM's directory and the pid from its pid file are enough.
    pub fn attach(pid: u32, dir: &Path) -> FcMachine {
        FcMachine { pid, api_socket: dir.join(API_SOCKET_NAME) }
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// PUT /machine-config, /boot-source, /drives/{id} (each), /network-interfaces/eth0, /vsock.
    pub async fn configure(&self, cfg: &FcConfig) -> Result<(), FcError> {
        for (path, body) in configure_requests(cfg)? {
            self.call(Method::PUT, &path, Some(&body), API_TIMEOUT).await?;
        }
        Ok(())
    }

    /// PUT /actions InstanceStart
    pub async fn start(&self) -> Result<(), FcError> {
        self.action("InstanceStart").await
    }

    /// PATCH /vm {"state":"Paused"}
    pub async fn pause(&self) -> Result<(), FcError> {
        self.call(Method::PATCH, "/vm", Some(&json!({ "state": "Paused" })), API_TIMEOUT).await.map(drop)
    }

    /// PATCH /vm {"state":"Resumed"}
    pub async fn resume(&self) -> Result<(), FcError> {
        self.call(Method::PATCH, "/vm", Some(&json!({ "state": "Resumed" })), API_TIMEOUT).await.map(drop)
    }

    /// PUT /snapshot/create Full. Firecracker refuses unless the VM is paused, so the snapshot is
    /// consistent; the memory file is as large as guest memory.
    pub async fn snapshot(&self, state: &Path, mem: &Path) -> Result<(), FcError> {
        let body = json!({
            "snapshot_type": "Full",
            "snapshot_path": utf8(state)?,
            "mem_file_path": utf8(mem)?,
        });
        self.call(Method::PUT, "/snapshot/create", Some(&body), SNAPSHOT_TIMEOUT).await.map(drop)
    }

    /// PUT /snapshot/load: the VM comes back from a template's snapshot, its memory file mapped private
    /// (Firecracker's `File` backend), resumed at once, its NIC on `tap` instead of the template's.
    pub async fn load_snapshot(&self, state: &Path, mem: &Path, tap: Option<&str>) -> Result<(), FcError> {
        self.call(Method::PUT, "/snapshot/load", Some(&load_snapshot_body(state, mem, tap)?), SNAPSHOT_TIMEOUT)
            .await
            .map(drop)
    }

    /// PUT /actions SendCtrlAltDel. The only graceful stop Firecracker offers on x86 (an i8042 key
    /// press); the guest must be booted with `reboot=k` for it to end the VMM.
    pub async fn send_ctrl_alt_del(&self) -> Result<(), FcError> {
        self.action("SendCtrlAltDel").await
    }

    /// GET / (instance info: `id`, `state` = "Not started" | "Running" | "Paused", `vmm_version`).
    pub async fn info(&self) -> Result<Value, FcError> {
        self.get_json("/").await
    }

    /// GET /machine-config
    pub async fn machine_config(&self) -> Result<Value, FcError> {
        self.get_json("/machine-config").await
    }

    async fn action(&self, action_type: &str) -> Result<(), FcError> {
        self.call(Method::PUT, "/actions", Some(&json!({ "action_type": action_type })), API_TIMEOUT).await.map(drop)
    }

    async fn get_json(&self, path: &str) -> Result<Value, FcError> {
        let body = self.call(Method::GET, path, None, API_TIMEOUT).await?;
        serde_json::from_slice(&body).map_err(|source| FcError::BadResponse {
            method: Method::GET.to_string(),
            path: path.to_string(),
            source,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Bytes, FcError> {
        call_socket(&self.api_socket, method, path, body, timeout).await
    }
}

/// The configuration calls in the order Firecracker's docs use, as (path, body); all are PUTs.
fn configure_requests(cfg: &FcConfig) -> Result<Vec<(String, Value)>, FcError> {
    let mut reqs = vec![
        ("/machine-config".to_string(), json!({ "vcpu_count": cfg.vcpus, "mem_size_mib": cfg.memory_mib })),
        ("/boot-source".to_string(), {
            let mut boot = json!({ "kernel_image_path": utf8(&cfg.kernel)?, "boot_args": cfg.boot_args });
            if let Some(initrd) = &cfg.initrd {
                boot["initrd_path"] = json!(utf8(initrd)?);
            }
            boot
        }),
    ];
    for drive in &cfg.drives {
        reqs.push((
            format!("/drives/{}", drive.id),
            json!({
                "drive_id": drive.id,
                "path_on_host": utf8(&drive.path)?,
                "is_root_device": drive.is_root,
                "is_read_only": drive.read_only,
            }),
        ));
    }
    if let Some((tap, mac)) = &cfg.net {
        reqs.push((
            "/network-interfaces/eth0".to_string(),
            json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac }),
        ));
    }
    if let Some((cid, uds)) = &cfg.vsock {
        reqs.push(("/vsock".to_string(), json!({ "guest_cid": cid, "uds_path": utf8(uds)? })));
    }
    Ok(reqs)
}

fn load_snapshot_body(state: &Path, mem: &Path, tap: Option<&str>) -> Result<Value, FcError> {
    let mut body = json!({
        "snapshot_path": utf8(state)?,
        "mem_backend": { "backend_type": "File", "backend_path": utf8(mem)? },
        "resume_vm": true,
    });
    if let Some(tap) = tap {
        body["network_overrides"] = json!([{ "iface_id": "eth0", "host_dev_name": tap }]);
    }
    Ok(body)
}

fn utf8(path: &Path) -> Result<&str, FcError> {
    path.to_str().ok_or_else(|| FcError::NonUtf8Path { path: path.to_path_buf() })
}

/// One request on a fresh connection; returns the body of a 2xx answer. A connection per call costs
/// microseconds on a local socket and means no connection state to keep or repair.
async fn call_socket(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Bytes, FcError> {
    let (status, bytes) = match tokio::time::timeout(timeout, exchange(socket, &method, path, body)).await {
        Ok(result) => result?,
        Err(_) => return Err(FcError::Timeout { method: method.to_string(), path: path.to_string(), after: timeout }),
    };
    tracing::trace!(%method, path, status = status.as_u16(), "firecracker api");
    if status.is_success() {
        Ok(bytes)
    } else {
        Err(FcError::Api {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            body: fault_message(&bytes),
        })
    }
}

async fn exchange(
    socket: &Path,
    method: &Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Bytes), FcError> {
    let http_err = |source| FcError::Http { method: method.to_string(), path: path.to_string(), source };
    let request = build_request(method, path, body)?;
    let stream = crate::host::connect_vm_socket(socket)
        .await
        .map_err(|source| FcError::Io { what: format!("connecting to {socket:?}"), source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
    // The connection future does the actual I/O; aborting it on every exit (including a timeout
    // dropping this future) closes the socket instead of leaving a task behind.
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status();
    let bytes = response.into_body().collect().await.map_err(http_err)?.to_bytes();
    drop(driver);
    Ok((status, bytes))
}

fn build_request(method: &Method, path: &str, body: Option<&Value>) -> Result<Request<Full<Bytes>>, FcError> {
    let builder = Request::builder()
        .method(method.clone())
        .uri(path)
        // HTTP/1.1 requires Host; Firecracker ignores its value.
        .header(header::HOST, "localhost")
        .header(header::ACCEPT, "application/json");
    let built = match body {
        Some(value) => {
            builder.header(header::CONTENT_TYPE, "application/json").body(Full::new(Bytes::from(value.to_string())))
        }
        None => builder.body(Full::new(Bytes::new())),
    };
    built.map_err(|source| FcError::Request { method: method.to_string(), path: path.to_string(), source })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Firecracker explains every rejection in `{"fault_message": "..."}`; that sentence is what a user
/// needs to see. Anything else is passed on as text so no detail is lost.
fn fault_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Fault {
        fault_message: String,
    }
    if let Ok(fault) = serde_json::from_slice::<Fault>(body) {
        return fault.fault_message;
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        "(no error message)".to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    #[test]
    fn fault_message_is_extracted_or_passed_through() {
        assert_eq!(fault_message(br#"{"fault_message":"Invalid drive"}"#), "Invalid drive");
        assert_eq!(fault_message(b"  not json \n"), "not json");
        assert_eq!(fault_message(b""), "(no error message)");
        assert_eq!(fault_message(br#"{"other":1}"#), r#"{"other":1}"#);
    }

    #[test]
    fn api_error_message_carries_the_fault_once() {
        let err =
            FcError::Api { method: "PUT".into(), path: "/drives/x".into(), status: 400, body: "No such file".into() };
        assert_eq!(err.to_string(), "Firecracker rejected PUT /drives/x with status 400: No such file");
        let io = FcError::Io { what: "reading".into(), source: io::Error::other("boom") };
        assert!(!io.to_string().contains("boom"), "the source must not be repeated: {io}");
        assert!(io.source().is_some());
    }

    #[test]
    fn snapshot_load_maps_memory_from_the_file_and_moves_the_nic_to_the_clones_tap() {
        let body = load_snapshot_body(Path::new("/t/state"), Path::new("/t/ram"), Some("bgtap7")).unwrap();
        assert_eq!(
            body,
            json!({"snapshot_path": "/t/state", "mem_backend": {"backend_type": "File", "backend_path": "/t/ram"},
                   "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "bgtap7"}]})
        );
        let no_nic = load_snapshot_body(Path::new("/t/state"), Path::new("/t/ram"), None).unwrap();
        assert!(no_nic.get("network_overrides").is_none());
    }

    #[test]
    fn instance_ids_follow_firecrackers_rule() {
        assert!(valid_instance_id("banger-vm-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        assert!(!valid_instance_id(""));
        assert!(!valid_instance_id("has_underscore"));
        assert!(!valid_instance_id("has space"));
        assert!(!valid_instance_id(&"a".repeat(65)));
        assert!(valid_instance_id(&"a".repeat(64)));
    }

    fn full_config() -> FcConfig {
        FcConfig {
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            boot_args: "console=ttyS0".into(),
            drives: vec![
                FcDrive { id: "root".into(), path: "/img/root.ext4".into(), read_only: true, is_root: true },
                FcDrive { id: "data".into(), path: "/vm/data".into(), read_only: false, is_root: false },
            ],
            net: Some(("tap0".into(), "06:00:ac:10:00:02".into())),
            vsock: Some((3, "/vm/v.sock".into())),
        }
    }

    #[test]
    fn configure_requests_follow_the_swagger() {
        let reqs = configure_requests(&full_config()).unwrap();
        let paths: Vec<&str> = reqs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["/machine-config", "/boot-source", "/drives/root", "/drives/data", "/network-interfaces/eth0", "/vsock"]
        );
        assert_eq!(reqs[0].1, json!({"vcpu_count": 2, "mem_size_mib": 256}));
        assert_eq!(
            reqs[1].1,
            json!({"kernel_image_path": "/k/vmlinux", "initrd_path": "/k/initrd", "boot_args": "console=ttyS0"})
        );
        assert_eq!(
            reqs[2].1,
            json!({"drive_id": "root", "path_on_host": "/img/root.ext4", "is_root_device": true, "is_read_only": true})
        );
        assert_eq!(reqs[3].1["is_read_only"], json!(false));
        assert_eq!(reqs[4].1, json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}));
        assert_eq!(reqs[5].1, json!({"guest_cid": 3, "uds_path": "/vm/v.sock"}));
    }

    #[test]
    fn configure_requests_omit_what_is_not_configured() {
        let cfg = FcConfig { initrd: None, drives: vec![], net: None, vsock: None, ..full_config() };
        let reqs = configure_requests(&cfg).unwrap();
        assert_eq!(reqs.len(), 2);
        assert!(reqs[1].1.get("initrd_path").is_none());
    }

    #[test]
    fn non_utf8_paths_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let bad = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff"));
        let cfg = FcConfig { kernel: bad.clone(), ..full_config() };
        assert!(matches!(configure_requests(&cfg), Err(FcError::NonUtf8Path { path }) if path == bad));
    }

    /// A one-shot HTTP server: returns the raw request it got and answers with `response`.
    async fn fake_api(listener: UnixListener, response: &'static str) -> String {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .map(|v| v.parse::<usize>().unwrap())
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length {
                    break;
                }
            }
            assert!(n > 0, "client closed before sending a whole request");
        }
        conn.write_all(response.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        String::from_utf8(raw).unwrap()
    }

    fn machine(dir: &Path) -> (FcMachine, UnixListener) {
        let socket = dir.join(API_SOCKET_NAME);
        let listener = UnixListener::bind(&socket).unwrap();
        (FcMachine { pid: 0, api_socket: socket }, listener)
    }

    #[tokio::test]
    async fn put_sends_json_and_accepts_204() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, listener) = machine(dir.path());
        let server = tokio::spawn(fake_api(listener, "HTTP/1.1 204 No Content\r\n\r\n"));
        vm.pause().await.unwrap();
        let raw = server.await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("PATCH /vm HTTP/1.1\r\n"), "{head}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("host: localhost"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), json!({"state": "Paused"}));
    }

    #[tokio::test]
    async fn get_parses_json() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, listener) = machine(dir.path());
        let body = r#"{"id":"x","state":"Not started","vmm_version":"1.12.1","app_name":"Firecracker"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let server = tokio::spawn(fake_api(listener, response));
        let info = vm.info().await.unwrap();
        assert!(server.await.unwrap().starts_with("GET / HTTP/1.1\r\n"));
        assert_eq!(info["state"], "Not started");
    }

    #[tokio::test]
    async fn rejection_becomes_api_error_with_fault_message() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, listener) = machine(dir.path());
        let body = r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#;
        let response: &'static str = Box::leak(
            format!("HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_boxed_str(),
        );
        let server = tokio::spawn(fake_api(listener, response));
        let err = vm.start().await.unwrap_err();
        let raw = server.await.unwrap();
        assert!(raw.contains(r#"{"action_type":"InstanceStart"}"#), "{raw}");
        match &err {
            FcError::Api { method, path, status, body } => {
                assert_eq!((method.as_str(), path.as_str(), *status), ("PUT", "/actions", 400));
                assert_eq!(body, "The requested operation is not supported after starting the microVM.");
            }
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn silent_api_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (vm, listener) = machine(dir.path());
        let _hold = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        let err = vm.call(Method::GET, "/", None, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, FcError::Timeout { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn spawn_reports_a_vmm_that_exits_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // sh rejects Firecracker's options and exits 2, complaining on stderr.
        let err = spawn(Path::new("/bin/sh"), dir.path(), "banger-vm-t1", &log).await.unwrap_err();
        assert!(matches!(&err, FcError::ExitedEarly { status, .. } if status.contains('2')), "{err:?}");
        assert!(std::fs::read_to_string(&log).unwrap().contains("Illegal option"));
    }

    #[tokio::test]
    async fn spawn_kills_a_vmm_whose_api_never_answers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fc");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.path().join("console.log");
        let wait = Duration::from_millis(300);
        let mut result = spawn_within(&fake, dir.path(), "banger-vm-t2", &log, None, wait).await;
        // A fork in a concurrently running test may briefly hold the script open for writing.
        for _ in 0..20 {
            match &result {
                Err(FcError::Spawn { source, .. }) if source.raw_os_error() == Some(libc::ETXTBSY) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    result = spawn_within(&fake, dir.path(), "banger-vm-t2", &log, None, wait).await;
                }
                _ => break,
            }
        }
        let err = result.unwrap_err();
        let FcError::ApiSocketTimeout { pid, .. } = err else { panic!("expected a timeout, got {err:?}") };
        // Killed and reaped by spawn: no such process any more, not even a zombie.
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} is still there");
    }

    #[tokio::test]
    async fn spawn_refuses_bad_markers_before_starting_anything() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let err = spawn(Path::new("/nonexistent"), dir.path(), "bad_marker", &log).await.unwrap_err();
        assert!(matches!(err, FcError::InvalidMarker { .. }), "{err:?}");
        assert!(!log.exists());
    }
}
