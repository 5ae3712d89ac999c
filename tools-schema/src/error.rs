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

/// A failed operation: a machine-readable code, a message saying what failed, and a hint saying what
/// to do next. Carried as JSON-RPC `error.data` and as MCP `structuredContent` of an `isError` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What failed, in one sentence.
    pub message: String,
    /// What to do about it, when banger knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), hint: None }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
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
    /// The message followed by the hint, for humans.
    pub fn display_with_hint(&self) -> String {
        match &self.hint {
            Some(h) => format!("{} [{}]\n  hint: {}", self.message, self.code.as_str(), h),
            None => format!("{} [{}]", self.message, self.code.as_str()),
        }
    }
}
