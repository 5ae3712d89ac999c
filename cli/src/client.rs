//! The CLI's JSON-RPC client: WebSocket over the daemon's Unix socket, typed by tools_schema operations.
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
            CallError::Api(e) => write!(f, "{}", e.display_with_hint()),
            CallError::Unreachable(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for CallError {}

impl Daemon {
    pub async fn connect(socket: &Path) -> Result<Daemon, CallError> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            CallError::Unreachable(format!(
                "cannot reach the banger daemon at {} ({e})\n  hint: start it with `banger daemon start`",
                socket.display()
            ))
        })?;
        let url = Url::parse("ws://localhost/").expect("static url");
        let (tx, rx) = WsTransportClientBuilder::default()
            .max_request_size(16 << 20)
            .max_response_size(64 << 20)
            .build_with_stream(url, stream)
            .await
            .map_err(|e| match e {
                jsonrpsee::client_transport::ws::WsHandshakeError::Rejected { status_code: 403 } => {
                    CallError::Unreachable(format!(
                        "the banger daemon at {} refused this user (uid {}): only its owner, root and members of \
                         its socket_group may use it\n  hint: ask the daemon's owner to set socket_group in its \
                         config and add you to that group",
                        socket.display(),
                        nix::unistd::getuid()
                    ))
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
    ) -> Result<jsonrpsee::core::client::Subscription<N>, CallError> {
        use jsonrpsee::core::client::SubscriptionClientT;
        let obj = object_params(params)?;
        self.client.subscribe::<N, _>(method, obj, unsubscribe).await.map_err(call_error)
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
