//! The one error type every operation returns, on every front door.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What kind of failure this is. Agents branch on this, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (bad value, missing field, unknown field). Fix the arguments.
    InvalidArgument,
    /// The named VM, image or other object does not exist.
    NotFound,
    /// An object with that name already exists.
    AlreadyExists,
    /// The object is in a state that does not allow this operation (e.g. exec on a stopped VM).
    FailedPrecondition,
    /// Another operation holds the object right now; retry later.
    Busy,
    /// The VM is running but its guest agent does not answer.
    GuestUnreachable,
    /// The host lacks something this operation needs (a binary, KVM, an asset). `banger doctor` says what.
    HostUnsupported,
    /// The operation did not finish in time.
    Timeout,
    /// The caller cancelled the operation (or disconnected); anything it created was rolled back.
    Cancelled,
    /// The caller is not allowed to use the daemon.
    PermissionDenied,
    /// The host has no room for this now: the memory the daemon may promise to VMs (`[limits]` in the
    /// config) would be exceeded, or the network has no free address. Retry once VMs are stopped or
    /// deleted, or raise the limit; nothing was made.
    ResourceExhausted,
    /// The method or tool does not exist.
    UnknownMethod,
    /// A bug or an unexpected host failure. The daemon log has details.
    Internal,
}

impl ErrorCode {
    /// JSON-RPC error code for this kind. The standard codes are used where they fit; banger's own
    /// codes live in the implementation-defined server-error range.
    pub fn json_rpc_code(self) -> i32 {
        match self {
            ErrorCode::InvalidArgument => -32602,
            ErrorCode::UnknownMethod => -32601,
            ErrorCode::Internal => -32603,
            ErrorCode::NotFound => -32004,
            ErrorCode::AlreadyExists => -32005,
            ErrorCode::FailedPrecondition => -32006,
            ErrorCode::Busy => -32007,
            ErrorCode::GuestUnreachable => -32008,
            ErrorCode::HostUnsupported => -32009,
            ErrorCode::Timeout => -32010,
            ErrorCode::Cancelled => -32011,
            ErrorCode::PermissionDenied => -32012,
            ErrorCode::ResourceExhausted => -32013,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Busy => "busy",
            ErrorCode::GuestUnreachable => "guest_unreachable",
            ErrorCode::HostUnsupported => "host_unsupported",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A failed operation: a machine-readable code, a message saying what failed, a hint saying what to do next,
/// and that next step as data when it is a banger operation. Carried as JSON-RPC `error.data` and as the JSON
/// text of an MCP `isError` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What failed, in one sentence, naming what the caller named.
    pub message: String,
    /// What to do about it, when banger knows. Over MCP it ends with the `next` steps as tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The operations that would help next, with their arguments: what each front door shows in its own terms
    /// (an MCP tool call, a JSON-RPC method, a `banger` command line).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next: Vec<NextStep>,
}

/// One next step an error suggests: a banger operation and the arguments that would do it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NextStep {
    /// The MCP tool, e.g. `vm_logs`.
    pub tool: String,
    /// The same operation's JSON-RPC method, e.g. `vm.logs`.
    pub method: String,
    /// Its arguments. A value in angle brackets (`<absolute path of a git work tree>`) is the caller's to fill in.
    pub arguments: serde_json::Map<String, serde_json::Value>,
    /// What it does for the caller here, in a few words.
    pub why: String,
}

impl NextStep {
    /// A step calling `method` (an operation of `ops::OPERATIONS`) with `arguments` (a JSON object).
    pub fn new(method: &str, arguments: serde_json::Value, why: impl Into<String>) -> NextStep {
        // A step the caller cannot make as written is a bug here, caught by every test that meets the error.
        debug_assert!(
            crate::ops::OperationSpec::by_method(method).is_some_and(|op| (op.check_params)(&arguments).is_ok()),
            "next step {method} {arguments} is not a valid call"
        );
        let arguments = match arguments {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        NextStep { tool: method.replace('.', "_"), method: method.to_string(), arguments, why: why.into() }
    }

    /// As an MCP agent calls it: `vm_logs {"vm":"dev"}`.
    pub fn as_tool_call(&self) -> String {
        format!("{} {}", self.tool, serde_json::Value::Object(self.arguments.clone()))
    }

    /// As a JSON-RPC client calls it: `vm.logs {"vm":"dev"}`.
    pub fn as_method_call(&self) -> String {
        format!("{} {}", self.method, serde_json::Value::Object(self.arguments.clone()))
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), hint: None, next: vec![] }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// Adds a next step (see `NextStep::new`); the hint should say in words what the steps are for.
    pub fn with_next(mut self, method: &str, arguments: serde_json::Value, why: impl Into<String>) -> Self {
        self.next.push(NextStep::new(method, arguments, why));
        self
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// The message, the hint and the next steps for humans, each step as `render` writes it (the CLI: a
    /// `banger` command line).
    pub fn display_with(&self, render: &dyn Fn(&NextStep) -> String) -> String {
        let mut text = format!("{} [{}]", self.message, self.code.as_str());
        if let Some(h) = &self.hint {
            text.push_str(&format!("\n  hint: {h}"));
        }
        for step in &self.next {
            text.push_str(&format!("\n  next: {}  ({})", render(step), step.why));
        }
        text
    }
    /// `display_with`, steps as JSON-RPC method calls.
    pub fn display_with_hint(&self) -> String {
        self.display_with(&NextStep::as_method_call)
    }
    /// The error as an MCP agent reads it: the hint ends with the next steps as tool calls, so a client that
    /// shows only the hint still names the tool to call.
    pub fn for_mcp(mut self) -> Self {
        if !self.next.is_empty() {
            let steps: Vec<String> =
                self.next.iter().map(|s| format!("call {} ({})", s.as_tool_call(), s.why)).collect();
            let steps = steps.join("; or ");
            self.hint = Some(match self.hint.take() {
                Some(h) => format!("{}. Next: {steps}", h.trim_end_matches('.')),
                None => format!("Next: {steps}"),
            });
        }
        self
    }
}
