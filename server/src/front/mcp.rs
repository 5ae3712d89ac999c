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
use tools_schema::ops::OperationSpec;
use tools_schema::portable::{portable, Direction::Input, Direction::Output};
use tools_schema::toolsets::{McpSessionOptions, Toolset, DEFAULT_TOOLSETS, MCP_OPTIONS_KEY};
use tools_schema::{ApiError, BuildInfo, ErrorCode};

use crate::engine::{CallContext, Engine, ProgressSink};

#[derive(Clone)]
pub struct McpServer {
    engine: Arc<Engine>,
    /// Cancelled the moment the client's side of the connection closes. rmcp itself lets in-flight
    /// handlers run for a grace period after EOF; banger's rule is that a client that goes away cancels
    /// its work (and a create rolls back), so handlers watch this too.
    closed: CancellationToken,
    /// The toolsets `tools/list` shows (`tools_schema::toolsets`); every tool can be called regardless.
    toolsets: Vec<Toolset>,
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

/// The MCP tool for an operation.
pub fn tool(op: &OperationSpec) -> Tool {
    let annotations = ToolAnnotations::new()
        .read_only(op.read_only)
        .destructive(op.destructive)
        .idempotent(op.idempotent)
        // banger acts on VMs on this host only.
        .open_world(false);
    Tool::new_with_raw(op.tool_name(), Some(op.description.into()), Arc::new(portable((op.params_schema)(), Input)))
        .with_raw_output_schema(Arc::new(portable((op.result_schema)(), Output)))
        .with_annotations(annotations)
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        info.server_info = Implementation::new("banger", BuildInfo::current().version);
        info.instructions = Some(instructions(&self.toolsets));
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(Toolset::listed(&self.toolsets).map(tool).collect()))
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
        let forwarder = context
            .meta
            .get_progress_token()
            .map(|token| progress_forwarder(token, context.peer.clone(), request.name.to_string()));
        let progress = forwarder.as_ref().map(|(sink, _)| sink.clone());
        let work = self.engine.dispatch(op.method, params, CallContext { cancel: cancel.clone(), progress });
        let result = tokio::select! {
            r = work => r,
            _ = context.ct.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "cancelled by the client").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
            _ = self.closed.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "the client disconnected").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
        };
        if let Some((_, events)) = forwarder {
            let (sent, flushed) = tokio::sync::oneshot::channel();
            if events.send(ProgressEvent::Finish { succeeded: result.is_ok(), sent }).is_ok() {
                // Bounded: a client that stopped reading must not hold the answer forever.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), flushed).await;
            }
        }
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

/// What the forwarder of a call's progress is told.
enum ProgressEvent {
    Report(f64, f64, String),
    /// The call is over: send the last notification (at its total when the call succeeded), then answer and
    /// send nothing more. MCP allows progress only for a request still in flight, so this happens before the
    /// response goes out.
    Finish {
        succeeded: bool,
        sent: tokio::sync::oneshot::Sender<()>,
    },
}

/// Sends progress notifications for a call, in order, dropping any that would not increase (MCP requires
/// progress to grow with each notification).
struct ProgressChannel(tokio::sync::mpsc::UnboundedSender<ProgressEvent>);

impl ProgressSink for ProgressChannel {
    fn report(&self, progress: f64, total: f64, message: String) {
        let _ = self.0.send(ProgressEvent::Report(progress, total, message));
    }
}

/// The call's progress sink, and the way to finish it (`ProgressEvent::Finish`).
fn progress_forwarder(
    token: ProgressToken,
    peer: Peer<RoleServer>,
    tool: String,
) -> (Arc<dyn ProgressSink>, tokio::sync::mpsc::UnboundedSender<ProgressEvent>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProgressEvent>();
    tokio::spawn(async move {
        let (mut last, mut last_total) = (f64::MIN, None::<f64>);
        let notify = |progress: f64, total: Option<f64>, message: String| {
            let mut p = ProgressNotificationParam::new(token.clone(), progress);
            p.total = total;
            p.message = Some(message);
            let peer = peer.clone();
            async move { peer.notify_progress(p).await.is_ok() }
        };
        while let Some(event) = rx.recv().await {
            match event {
                ProgressEvent::Report(progress, total, message) => {
                    if progress <= last {
                        continue;
                    }
                    (last, last_total) = (progress, Some(total));
                    if !notify(progress, Some(total), message).await {
                        return;
                    }
                }
                ProgressEvent::Finish { succeeded, sent } => {
                    if let Some(total) = last_total.filter(|t| succeeded && last < *t) {
                        notify(total, Some(total), format!("{tool}: done")).await;
                    }
                    let _ = sent.send(());
                    // Whatever a still-running task reports from here on is for a request already answered.
                    return;
                }
            }
        }
    });
    (Arc::new(ProgressChannel(tx.clone())), tx)
}

/// A failed call: `isError` with the typed error (`{code, message, hint, next}`) as JSON text, its hint ending
/// with the next steps as tool calls (`ApiError::for_mcp`). Not as
/// structuredContent: clients validate that against the tool's output schema, which describes success.
fn error_result(e: ApiError) -> CallToolResult {
    let e = e.for_mcp();
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

/// What `initialize` tells the agent: the job in a sentence, how errors read, and which toolsets it has and
/// which it could ask for.
fn instructions(sets: &[Toolset]) -> String {
    let names = |sets: &mut dyn Iterator<Item = &Toolset>| sets.map(|s| s.name()).collect::<Vec<_>>().join(", ");
    let listed = names(&mut sets.iter());
    let more = names(&mut Toolset::ALL.iter().filter(|s| !sets.contains(s)));
    let mut text = String::from(
        "banger runs microVM sandboxes on this host. Create one with vm_create (or vm_run, which also puts a host \
         repository in it), run commands with vm_exec, and delete it with vm_delete when done. Every tool returns \
         structured content; a failed call has isError set and its text is a JSON error {code, message, hint, \
         next}: code tells not_found from busy from guest_unreachable from invalid_argument, hint says what to \
         do, and next lists the tool calls that would help, with their arguments.",
    );
    text.push_str(&format!(" Toolsets listed: {listed}."));
    if !more.is_empty() {
        text.push_str(&format!(
            " Not listed (start `banger mcp --toolsets {more}` to list them; their tools can still be called by \
             name): {more}."
        ));
    }
    text
}

/// The most an options line may take before the client's first MCP message.
const OPTIONS_LINE_MAX: usize = 64 << 10;

/// Reads the connection's first line: `banger mcp`'s options line (consumed), or the client's first MCP
/// message, which is handed back to be read again. Returns the toolsets and the bytes read beyond the options.
async fn read_options(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<(Vec<Toolset>, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let newline = loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            break i;
        }
        if buf.len() > OPTIONS_LINE_MAX {
            // No line yet: not an options line (they are short); rmcp reads the rest as it will.
            return Ok((DEFAULT_TOOLSETS.to_vec(), buf));
        }
        let mut chunk = [0u8; 4096];
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok((DEFAULT_TOOLSETS.to_vec(), buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    // An options line is an object with that one key; anything else is the client's first MCP message.
    let line: Option<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(&buf[..newline]).ok();
    let Some(options) = line.filter(|l| l.len() == 1).and_then(|mut l| l.remove(MCP_OPTIONS_KEY)) else {
        return Ok((DEFAULT_TOOLSETS.to_vec(), buf));
    };
    let options: McpSessionOptions = serde_json::from_value(options).map_err(|e| {
        format!("invalid {MCP_OPTIONS_KEY}: {e}; toolsets are {}", Toolset::ALL.map(|s| s.name()).join(", "))
    })?;
    let mut sets = options.toolsets;
    sets.extend_from_slice(DEFAULT_TOOLSETS);
    sets.sort();
    sets.dedup();
    Ok((sets, buf.split_off(newline + 1)))
}

pub async fn serve(stream: UnixStream, engine: Arc<Engine>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let closed = CancellationToken::new();
    let (mut rd, mut wr) = stream.into_split();
    let (toolsets, rest) = match read_options(&mut rd).await {
        Ok(read) => read,
        Err(why) => {
            // Said in JSON-RPC, which the client speaks, before anything else happens.
            let e = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32602, "message": why}});
            let _ = wr.write_all(format!("{e}\n").as_bytes()).await;
            return;
        }
    };
    let rd = std::io::Cursor::new(rest).chain(rd);
    let server = McpServer { engine, closed: closed.clone(), toolsets };
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
