//! JSON-RPC 2.0 over the Unix socket (HTTP POST or WebSocket), served by jsonrpsee.
use std::sync::Arc;

use jsonrpsee::server::{
    serve_with_graceful_shutdown, stop_channel, Methods, RpcModule, Server, ServerConfig, StopHandle,
};
use jsonrpsee::types::ErrorObjectOwned;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tools_schema::ops::{params_or_empty, OPERATIONS};
use tools_schema::ApiError;

use crate::engine::{CallContext, Engine};

#[derive(Clone)]
pub struct JsonRpc {
    methods: Methods,
    stop: StopHandle,
    _server_handle: Arc<jsonrpsee::server::ServerHandle>,
}

pub fn to_rpc_error(e: ApiError) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(e.code.json_rpc_code(), e.message.clone(), Some(e))
}

impl JsonRpc {
    pub fn new(engine: Arc<Engine>) -> JsonRpc {
        let mut module = RpcModule::new(engine);
        for op in OPERATIONS {
            let method = op.method;
            module
                .register_async_method(method, move |params, engine, _| async move {
                    let params: Option<serde_json::Value> = params.parse().map_err(|e: ErrorObjectOwned| {
                        to_rpc_error(
                            ApiError::invalid(format!("params of {method} are not valid JSON: {}", e.message()))
                                .with_hint(format!("send params of {method} as a JSON object (docs/API.md)")),
                        )
                    })?;
                    // Dropping this future (the client went away) cancels the token, and with it the work.
                    let cancel = CancellationToken::new();
                    let _guard = cancel.clone().drop_guard();
                    engine
                        .dispatch(method, params_or_empty(params), CallContext { cancel, progress: None })
                        .await
                        .map_err(to_rpc_error)
                })
                .expect("operation names are unique");
        }
        register_session_subscriptions(&mut module);
        let (stop, handle) = stop_channel();
        JsonRpc { methods: module.into(), stop, _server_handle: Arc::new(handle) }
    }

    pub async fn serve(&self, stream: UnixStream, shutdown: CancellationToken) {
        let config = ServerConfig::builder()
            .max_request_body_size(super::MAX_REQUEST_BYTES)
            .max_response_body_size(super::MAX_RESPONSE_BYTES)
            .build();
        let builder = Server::builder().set_config(config).to_service_builder();
        let svc = builder.build(self.methods.clone(), self.stop.clone());
        if let Err(e) = serve_with_graceful_shutdown(stream, svc, shutdown.cancelled_owned()).await {
            tracing::debug!(error = %e, "json-rpc connection ended");
        }
    }
}

/// The session subscriptions (`tools_schema::session::SUBSCRIPTIONS`), registered by hand: they stream,
/// which the generated request/response list cannot express. Params are checked and the attach claim is
/// taken before the subscription is accepted, so a refusal is an ordinary JSON-RPC error.
fn register_session_subscriptions(module: &mut RpcModule<Arc<Engine>>) {
    use tools_schema::session::{SessionFollowParams, SUBSCRIPTIONS};
    for &(method, notification, unsubscribe, _) in SUBSCRIPTIONS {
        let attach = method == "session.attach";
        module
            .register_subscription(method, notification, unsubscribe, move |params, pending, engine, _| async move {
                let params: Option<serde_json::Value> = match params.parse() {
                    Ok(p) => p,
                    Err(e) => {
                        let msg = format!("params of {method} are not valid JSON: {}", e.message());
                        return pending
                            .reject(to_rpc_error(
                                ApiError::invalid(msg)
                                    .with_hint(format!("send params of {method} as a JSON object (docs/API.md)")),
                            ))
                            .await;
                    }
                };
                let follow: SessionFollowParams = match serde_json::from_value(params_or_empty(params)).map_err(|e| {
                    ApiError::invalid(format!("invalid params for {method}: {e}"))
                        .with_hint("see the session subscriptions in docs/API.md")
                }) {
                    Ok(p) => p,
                    Err(e) => return pending.reject(to_rpc_error(e)).await,
                };
                let mut follower = match engine.session_follow(follow, attach).await {
                    Ok(f) => f,
                    Err(e) => return pending.reject(to_rpc_error(e)).await,
                };
                let Ok(sink) = pending.accept().await else { return };
                loop {
                    let event = tokio::select! {
                        ev = follower.next() => ev,
                        // The subscriber went away: dropping the follower releases the attachment.
                        _ = sink.closed() => break,
                    };
                    let Some(event) = event else { break };
                    let msg = serde_json::value::to_raw_value(&event).expect("events serialise");
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                tracing::debug!(session = %follower.session_id(), method, "subscription ended");
            })
            .expect("subscription names are unique");
    }
}
