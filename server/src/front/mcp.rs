//! MCP over the Unix socket (newline-delimited JSON-RPC, as `banger mcp` relays it from stdio), served
//! by rmcp. Tools are generated from `tools_schema::ops::OPERATIONS`.
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::model::{ProgressNotificationParam, ProgressToken};
use rmcp::service::{Peer, RequestContext};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tools_schema::ops::{OperationSpec, OPERATIONS};
use tools_schema::{ApiError, BuildInfo, ErrorCode};

use crate::engine::{CallContext, Engine, ProgressSink};

#[derive(Clone)]
pub struct McpServer {
    engine: Arc<Engine>,
    /// Cancelled the moment the client's side of the connection closes. rmcp itself lets in-flight
    /// handlers run for a grace period after EOF; banger's rule is that a client that goes away cancels
    /// its work (and a create rolls back), so handlers watch this too.
    closed: CancellationToken,
}

/// The read half of a connection, cancelling a token at EOF or on a read error.
struct EofSignal<R> {
    inner: R,
    closed: CancellationToken,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EofSignal<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        match &poll {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => self.closed.cancel(),
            std::task::Poll::Ready(Err(_)) => self.closed.cancel(),
            _ => {}
        }
        poll
    }
}

fn schema_object(schema: schemars::Schema) -> Arc<serde_json::Map<String, serde_json::Value>> {
    match schema.to_value() {
        serde_json::Value::Object(m) => Arc::new(m),
        _ => Arc::new(serde_json::Map::new()),
    }
}

/// The MCP tool for an operation.
pub fn tool(op: &OperationSpec) -> Tool {
    let annotations = ToolAnnotations::new()
        .read_only(op.read_only)
        .destructive(op.destructive)
        .idempotent(op.idempotent)
        // banger acts on VMs on this host only.
        .open_world(false);
    Tool::new_with_raw(op.tool_name(), Some(op.description.into()), schema_object((op.params_schema)()))
        .with_raw_output_schema(schema_object((op.result_schema)()))
        .with_annotations(annotations)
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("banger", BuildInfo::current().version);
        info.instructions = Some(
            "banger runs microVM sandboxes on this host. Create one with vm_create, run commands with vm_exec, \
             and delete it with vm_delete when done. Every tool returns structured content; a failed call has \
             isError set and its text is a JSON error {code, message, hint}: code tells not_found from busy from \
             guest_unreachable from invalid_argument, and hint says what to do next."
                .into(),
        );
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(OPERATIONS.iter().map(tool).collect()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let Some(op) = OperationSpec::by_tool_name(&request.name) else {
            let err = ApiError::new(ErrorCode::UnknownMethod, format!("unknown tool `{}`", request.name))
                .with_hint("tools/list shows every banger tool");
            return Ok(error_result(err).into());
        };
        let params = serde_json::Value::Object(request.arguments.unwrap_or_default());
        let cancel = CancellationToken::new();
        let _guard = cancel.clone().drop_guard();
        let progress = context.meta.get_progress_token().map(|token| progress_forwarder(token, context.peer.clone()));
        let work = self.engine.dispatch(op.method, params, CallContext { cancel: cancel.clone(), progress });
        let result = tokio::select! {
            r = work => r,
            _ = context.ct.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "cancelled by the client").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
            _ = self.closed.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "the client disconnected").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
        };
        Ok(match result {
            Ok(value) => {
                let summary = summarize(op, &value);
                let mut r = CallToolResult::structured(value);
                r.content = vec![ContentBlock::text(summary)];
                r
            }
            Err(e) => error_result(e),
        }
        .into())
    }
}

/// Sends progress notifications for a call, in order, dropping any that would not increase (MCP requires
/// progress to grow with each notification).
struct ProgressChannel(tokio::sync::mpsc::UnboundedSender<(f64, f64, String)>);

impl ProgressSink for ProgressChannel {
    fn report(&self, progress: f64, total: f64, message: String) {
        let _ = self.0.send((progress, total, message));
    }
}

fn progress_forwarder(token: ProgressToken, peer: Peer<RoleServer>) -> Arc<dyn ProgressSink> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(f64, f64, String)>();
    tokio::spawn(async move {
        let mut last = f64::MIN;
        while let Some((progress, total, message)) = rx.recv().await {
            if progress <= last {
                continue;
            }
            last = progress;
            let mut p = ProgressNotificationParam::new(token.clone(), progress);
            p.total = Some(total);
            p.message = Some(message);
            if peer.notify_progress(p).await.is_err() {
                return;
            }
        }
    });
    Arc::new(ProgressChannel(tx))
}

/// A failed call: `isError` with the typed error (`{code, message, hint}`) as JSON text. Not as
/// structuredContent: clients validate that against the tool's output schema, which describes success.
fn error_result(e: ApiError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(serde_json::to_string(&e).unwrap_or_else(|_| e.display_with_hint()))])
}

/// The text content of a result: a one-line summary an agent can act on (`vm.create: name=dev state=running
/// ...`), then the result as JSON for clients that only read text (the MCP spec asks for it), cut at
/// `TEXT_JSON_MAX` with a note; structuredContent always has all of it.
fn summarize(op: &OperationSpec, value: &serde_json::Value) -> String {
    const TEXT_JSON_MAX: usize = 16 << 10;
    let mut text = format!("{}: {}\n", op.method, summary_line(value));
    let json = value.to_string();
    if json.len() <= TEXT_JSON_MAX {
        text.push_str(&json);
    } else {
        let mut cut = TEXT_JSON_MAX;
        while !json.is_char_boundary(cut) {
            cut -= 1;
        }
        text.push_str(&json[..cut]);
        text.push_str(&format!(
            "… (cut at {TEXT_JSON_MAX} of {} bytes in this text; structuredContent has the whole result)",
            json.len()
        ));
    }
    text
}

/// Top-level facts of a result, briefly: scalars as `key=value` (long strings shortened), lists and objects
/// as counts.
fn summary_line(value: &serde_json::Value) -> String {
    use serde_json::Value;
    let Value::Object(map) = value else { return String::new() };
    let mut parts = vec![];
    for (k, v) in map {
        let shown = match v {
            Value::Null => continue,
            Value::String(s) if s.chars().count() > 60 => {
                format!("{}… ({} bytes)", s.chars().take(40).collect::<String>(), s.len())
            }
            Value::String(s) => s.replace('\n', "\\n"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::Object(o) => format!("{{{} fields}}", o.len()),
            other => other.to_string(),
        };
        parts.push(format!("{k}={shown}"));
    }
    parts.join(" ")
}

pub async fn serve(stream: UnixStream, engine: Arc<Engine>) {
    let closed = CancellationToken::new();
    let (rd, wr) = stream.into_split();
    let server = McpServer { engine, closed: closed.clone() };
    match server.serve((EofSignal { inner: rd, closed }, wr)).await {
        Ok(running) => {
            let _ = running.waiting().await;
        }
        Err(e) => tracing::debug!(error = %e, "mcp session ended during initialisation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_starts_with_a_short_summary_and_keeps_the_json_within_bounds() {
        let op = OperationSpec::by_method("vm.exec").unwrap();
        let small =
            serde_json::json!({"exit_code": 3, "stdout": "hi\n", "stderr": "", "timed_out": false, "output_id": null});
        let t = summarize(op, &small);
        assert!(t.starts_with("vm.exec: exit_code=3 stderr= stdout=hi\\n timed_out=false\n{"), "{t}");
        let big = serde_json::json!({"stdout": "x".repeat(100_000), "files": [1, 2, 3]});
        let t = summarize(op, &big);
        assert!(t.lines().next().unwrap().contains("files=[3 items]") && t.contains("(100000 bytes)"), "{t}");
        assert!(t.len() < 17 << 10 && t.ends_with("structuredContent has the whole result)"), "{}", t.len());
    }
}
