//! The daemon's front doors, on one Unix socket.
//!
//! Each accepted connection is first checked by peer credentials (root, the daemon's own user, or a member
//! of the configured group), then routed by its first byte: `{` starts an MCP session (newline-delimited
//! JSON-RPC, what `banger mcp` relays from stdio); anything else is HTTP, served by jsonrpsee (JSON-RPC over
//! HTTP POST or WebSocket). Both call `Engine::dispatch`, so they cannot drift apart.
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

pub mod mcp;
pub mod rpc;
pub mod web;

/// Largest request a client may send, on either front door.
pub const MAX_REQUEST_BYTES: u32 = 16 << 20;
/// Largest response (exec output can be up to 2 x 8 MiB, and JSON escaping grows it).
pub const MAX_RESPONSE_BYTES: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another bangerd is already serving {0}")]
    InUse(String),
    #[error("cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket group `{0}` does not exist")]
    NoSuchGroup(String),
}

/// Who may talk to the daemon.
#[derive(Clone)]
pub struct Access {
    owner_uid: u32,
    group_gid: Option<u32>,
}

impl Access {
    fn allows(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = stream.peer_cred().map_err(|e| format!("cannot read peer credentials: {e}"))?;
        let uid = cred.uid();
        if uid == 0 || uid == self.owner_uid {
            return Ok(());
        }
        if let Some(gid) = self.group_gid {
            let in_group = cred.gid() == gid || cred.pid().is_some_and(|pid| supplementary_groups(pid).contains(&gid));
            if in_group {
                return Ok(());
            }
        }
        Err(format!("uid {uid} may not use this banger daemon"))
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    crate::host::status_field(pid as u32, "Groups")
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Binds the socket private to its owner (and group, if configured). Refuses to steal a live daemon's
/// socket; removes a stale one.
pub async fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, Access), ListenError> {
    let bind_err = |source| ListenError::Bind { path: path.display().to_string(), source };
    let group_gid = match group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| ListenError::NoSuchGroup(g.to_string()))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    if let Some(parent) = path.parent() {
        let made = !parent.exists();
        std::fs::create_dir_all(parent).map_err(bind_err)?;
        // The daemon's umask makes it 0700; the socket group's members must reach the socket in it.
        if made && group_gid.is_some() {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(bind_err)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    // Create the socket with no access for others from the first instant, then open it to the group.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(bind_err)?;
    if let Some(gid) = group_gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| bind_err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    }
    Ok((listener, Access { owner_uid: nix::unistd::geteuid().as_raw(), group_gid }))
}

/// Accepts connections until `shutdown` fires.
pub async fn serve(listener: UnixListener, access: Access, engine: Arc<Engine>, shutdown: CancellationToken) {
    let rpc = rpc::JsonRpc::new(engine.clone());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let (access, engine, rpc, shutdown) = (access.clone(), engine.clone(), rpc.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(why) = access.allows(&stream) {
                tracing::warn!(%why, "refused a connection");
                refuse(stream, &why).await;
                return;
            }
            match first_byte(&stream).await {
                Some(b'{') => mcp::serve(stream, engine).await,
                Some(_) => rpc.serve(stream, shutdown).await,
                None => {}
            }
        });
    }
}

/// Peeks at the first byte without consuming it; `None` if the peer closed first.
async fn first_byte(stream: &UnixStream) -> Option<u8> {
    loop {
        stream.readable().await.ok()?;
        let mut b = [0u8; 1];
        let res = stream.try_io(tokio::io::Interest::READABLE, || {
            nix::sys::socket::recv(stream.as_raw_fd(), &mut b, nix::sys::socket::MsgFlags::MSG_PEEK)
                .map_err(std::io::Error::from)
        });
        match res {
            Ok(0) => return None,
            Ok(_) => return Some(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

/// Tells a refused peer why, in whichever protocol it speaks.
async fn refuse(mut stream: UnixStream, why: &str) {
    let err = tools_schema::ApiError::new(tools_schema::ErrorCode::PermissionDenied, why)
        .with_hint("ask the daemon's owner to add you to its socket_group");
    let body = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {
        "code": err.code.json_rpc_code(), "message": err.message, "data": err}});
    let msg = match first_byte(&stream).await {
        Some(b'{') => format!("{body}\n"),
        _ => format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.to_string().len()
        ),
    };
    let _ = stream.write_all(msg.as_bytes()).await;
    let _ = stream.shutdown().await;
}
