//! The JSON-RPC client: WebSocket over the daemon's Unix socket, typed by tools_schema operations.

pub use jsonrpsee::core::client::Subscription;
use std::path::Path;
use std::time::Duration;

use jsonrpsee::client_transport::ws::{Url, WsTransportClientBuilder};
use jsonrpsee::core::client::{ClientBuilder, ClientT};
use jsonrpsee::core::params::ObjectParams;
use tokio::net::UnixStream;
use tools_schema::ops::Operation;
use tools_schema::{ApiError, ErrorCode};

pub struct Daemon {
    client: jsonrpsee::core::client::Client,
}

/// Why a call failed: the daemon answered with an error, or it could not be reached.
#[derive(Debug)]
pub enum CallError {
    Api(ApiError),
    Unreachable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Api(e) => write!(f, "{}", e.display_with(&crate::next_step::command_line)),
            CallError::Unreachable(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for CallError {}

impl Daemon {
    pub async fn connect(socket: &Path) -> Result<Daemon, CallError> {
        trust_socket(socket)?;
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            CallError::Unreachable(if e.kind() == std::io::ErrorKind::PermissionDenied {
                permission_hint(socket, &e)
            } else {
                format!(
                    "cannot reach the banger daemon at {} ({e})\n  hint: start it with `banger daemon start`",
                    socket.display()
                )
            })
        })?;
        let url = Url::parse("ws://localhost/").expect("static url");
        let (tx, rx) = WsTransportClientBuilder::default()
            .max_request_size(16 << 20)
            .max_response_size(64 << 20)
            .build_with_stream(url, stream)
            .await
            .map_err(|e| match e {
                jsonrpsee::client_transport::ws::WsHandshakeError::Rejected { status_code: 403 } => {
                    CallError::Unreachable(permission_hint(socket, &"the daemon refused this user"))
                }
                other => CallError::Unreachable(format!("websocket handshake with the daemon failed: {other}")),
            })?;
        let client = ClientBuilder::default()
            // VM boots and image builds are long; the daemon enforces its own deadlines.
            .request_timeout(Duration::from_secs(3600))
            .max_buffer_capacity_per_subscription(1024)
            .build_with_tokio(tx, rx);
        Ok(Daemon { client })
    }

    /// Calls an operation with typed params and result.
    pub async fn call<O: Operation>(&self, params: &O::Params) -> Result<O::Result, CallError> {
        let obj = object_params(params)?;
        self.client.request::<O::Result, _>(O::METHOD, obj).await.map_err(call_error)
    }
}

impl Daemon {
    /// Opens a JSON-RPC subscription (e.g. `session.attach`) whose notifications are `N`.
    pub async fn subscribe<N: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        unsubscribe: &str,
        params: &impl serde::Serialize,
    ) -> Result<Subscription<N>, CallError> {
        use jsonrpsee::core::client::SubscriptionClientT;
        let obj = object_params(params)?;
        self.client.subscribe::<N, _>(method, obj, unsubscribe).await.map_err(call_error)
    }
}

/// Refuses a socket another user could have planted: a daemon's socket belongs to root or to this user.
/// (The calls sent there carry commands, files and secrets such as environment variables.)
fn trust_socket(socket: &Path) -> Result<(), CallError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::symlink_metadata(socket) else {
        return Ok(()); // Not there, or not reachable: connect says which, with its hint.
    };
    let me = nix::unistd::getuid().as_raw();
    if !meta.file_type().is_socket() || (meta.uid() != 0 && meta.uid() != me) {
        return Err(CallError::Unreachable(format!(
            "refusing {}: it is not a socket owned by root or by you (uid {me}), so it is not a banger daemon you \
             can trust\n  hint: remove it if it is yours, or point --socket (BANGER_SOCKET) at your daemon's socket",
            socket.display()
        )));
    }
    Ok(())
}

/// Says why this user may not use the daemon, naming the group that grants access.
fn permission_hint(socket: &Path, why: &dyn std::fmt::Display) -> String {
    use std::os::unix::fs::MetadataExt;
    // The socket itself, or the first folder above it that can be looked at, carries the group.
    let group = socket
        .ancestors()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.gid())
        .find(|gid| *gid != 0)
        .and_then(|gid| nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).ok().flatten())
        .map(|g| g.name);
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name);
    let user = name.clone().unwrap_or_else(|| uid.to_string());
    let who = match name {
        Some(n) => format!("{n}, uid {uid}"),
        None => format!("uid {uid}"),
    };
    match group {
        Some(g) => format!(
            "permission denied: you ({who}) may not use the banger daemon at {} ({why}); members of the group \
             `{g}` may\n  hint: `sudo usermod -aG {g} {user}`, then log out and in again (or run `newgrp {g}`)",
            socket.display()
        ),
        None => format!(
            "permission denied: you ({who}) may not use the banger daemon at {} ({why}); only its owner and root \
             may\n  hint: ask its owner to set socket_group in the daemon's config and add you to that group \
             (scripts/setup-host.sh, run with sudo, sets up the group `banger` for you)",
            socket.display()
        ),
    }
}

fn object_params(params: &impl serde::Serialize) -> Result<ObjectParams, CallError> {
    let value = serde_json::to_value(params).map_err(|e| CallError::Unreachable(format!("encoding params: {e}")))?;
    let mut obj = ObjectParams::new();
    if let serde_json::Value::Object(m) = value {
        for (k, v) in m {
            obj.insert(&k, v).map_err(|e| CallError::Unreachable(e.to_string()))?;
        }
    }
    Ok(obj)
}

fn call_error(e: jsonrpsee::core::ClientError) -> CallError {
    match e {
        jsonrpsee::core::ClientError::Call(obj) => {
            let api = obj
                .data()
                .and_then(|d| serde_json::from_str::<ApiError>(d.get()).ok())
                .unwrap_or_else(|| ApiError::new(ErrorCode::Internal, obj.message().to_string()));
            CallError::Api(api)
        }
        other => CallError::Unreachable(format!("talking to the daemon failed: {other}")),
    }
}
