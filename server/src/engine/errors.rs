//! The engine's error mapping: what each internal error (`VmmError`, `GuestError`, `StoreError`) means to the
//! caller, as an `ApiError` with a code and a hint. Every module of the engine maps through here, so none has
//! to import another for it (warm/ and vm/ both use this file, not each other).
//!
//! Nothing here reads an error's text to decide what it is: VMM errors by variant, the agent's by its
//! `GuestErrorKind` (the guest's message is untrusted and already capped and escaped by `GuestError::agent`).
use tools_schema::guest::GuestErrorKind;
use tools_schema::{ApiError, ErrorCode};

use crate::guest::GuestError;
use crate::store::StoreError;
use crate::vmm::VmmError;

pub(crate) fn vmm_error(e: VmmError) -> ApiError {
    match e {
        VmmError::MissingBinary { .. } => ApiError::new(ErrorCode::HostUnsupported, e.to_string())
            .with_hint("run scripts/setup-host.sh, then `banger doctor`"),
        // Their messages carry the VMM's own answer (or the program's output) already.
        VmmError::Launch { .. }
        | VmmError::Io { .. }
        | VmmError::Qmp { .. }
        | VmmError::Firecracker { .. }
        | VmmError::Guest(_) => ApiError::internal(error_chain(&e)).with_hint("`banger doctor` checks the host set-up"),
    }
}

/// An error and its causes, `a: b: c`. A cause whose text its error already ends with (a `{source}` in the
/// error's own message) is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// File errors from the agent: a missing file is the caller's `not_found`; any other failure to use the path
/// the caller named (a directory, no permission, a full disk) is about that path: `invalid_argument`.
pub(crate) fn file_error(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Agent { kind: GuestErrorKind::NotFound, message } => {
            ApiError::not_found(message).with_hint(format!("`banger vm exec {vm} -- ls -la <dir>` lists what is there"))
        }
        GuestError::Agent { message, .. } => ApiError::invalid(message)
            .with_hint(format!("check the path and its permissions: `banger vm exec {vm} -- ls -ld <path>`")),
        other => guest_error(vm, other),
    }
}

/// A guest call's failure as the caller's error. An agent's error is mapped by its kind alone.
pub(crate) fn guest_error(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Cancelled => ApiError::new(ErrorCode::Cancelled, "cancelled by the caller"),
        GuestError::Timeout(_) => ApiError::new(ErrorCode::Timeout, format!("VM {vm}: {e}"))
            .with_hint(format!("`banger vm logs {vm}` shows the guest console")),
        GuestError::Agent { kind, message } => agent_error(vm, kind, message),
        other => ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: {}", error_chain(&other)))
            .with_hint(format!("`banger vm logs {vm}` shows the guest console; `banger vm restart {vm}` reboots it")),
    }
}

/// What each kind of agent error means to the caller, with what to do next.
fn agent_error(vm: &str, kind: GuestErrorKind, message: String) -> ApiError {
    match kind {
        GuestErrorKind::NotFound => {
            ApiError::not_found(message).with_hint(format!("`banger vm session list {vm}` shows the VM's sessions"))
        }
        GuestErrorKind::Invalid => ApiError::invalid(message).with_hint("fix the request's arguments and try again"),
        GuestErrorKind::CannotRun => ApiError::invalid(message)
            .with_hint(format!("check the program and directory in the guest: `banger vm exec {vm} -- ls -l <path>`")),
        GuestErrorKind::BadOffset => {
            ApiError::invalid(message).with_hint("continue from the next_offset of the previous read, or from 0")
        }
        GuestErrorKind::InputClosed => {
            ApiError::precondition(message).with_hint("`banger vm session show` says how the session ended")
        }
        GuestErrorKind::Other => {
            ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: the guest agent reported: {message}"))
                .with_hint(format!(
                    "`banger vm logs {vm}` shows the guest console; `banger vm restart {vm}` reboots it"
                ))
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = ?e, "store");
        ApiError::internal(error_chain(&e))
            .with_hint("the daemon log has details; check free space in the state directory")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tools_schema::guest::GuestResponse;

    /// The agent's answer as the host decodes it off the wire, then maps it.
    fn from_wire(json: &str) -> GuestError {
        match serde_json::from_str::<GuestResponse>(json).unwrap() {
            GuestResponse::Error { kind, message } => GuestError::agent(kind, &message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn agent_errors_map_by_kind_never_by_text() {
        // Each message says the opposite of its kind: only the kind may decide.
        let cases = [
            ("not_found", "cannot run it: stopped reading", ErrorCode::NotFound),
            ("invalid", "No such file or directory", ErrorCode::InvalidArgument),
            ("cannot_run", "no session `x` in the guest", ErrorCode::InvalidArgument),
            ("bad_offset", "the stdin is closed", ErrorCode::InvalidArgument),
            ("input_closed", "offset 9 is past the end", ErrorCode::FailedPrecondition),
            ("other", "No such file; cannot run; no session; offset; closed", ErrorCode::GuestUnreachable),
        ];
        for (kind, message, code) in cases {
            let e = guest_error(
                "vm1",
                from_wire(&format!(r#"{{"result":"error","kind":"{kind}","message":"{message}"}}"#)),
            );
            assert_eq!(e.code, code, "{kind}: {e:?}");
            assert!(e.message.contains(message), "{kind}: {e:?}");
            assert!(e.hint.is_some(), "{kind}: no hint");
        }
    }

    #[test]
    fn an_unknown_bogus_or_missing_kind_is_the_catch_all() {
        for json in [
            r#"{"result":"error","message":"No such file or directory"}"#,
            r#"{"result":"error","kind":"file_not_found","message":"No such file or directory"}"#,
            r#"{"result":"error","kind":{"not_found":true},"message":"No such file or directory"}"#,
            r#"{"result":"error","kind":7,"message":"cannot run"}"#,
        ] {
            let e = guest_error("vm1", from_wire(json));
            assert_eq!(e.code, ErrorCode::GuestUnreachable, "{json}: {e:?}");
            // A file call treats anything but a missing file as about the path; a missing kind is not a missing file.
            let e = file_error("vm1", from_wire(json));
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{json}: {e:?}");
        }
    }

    #[test]
    fn file_errors_are_not_found_only_when_the_agent_says_so() {
        let e = file_error("vm1", from_wire(r#"{"result":"error","kind":"not_found","message":"cannot read /x"}"#));
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::NotFound, "cannot read /x"));
        let e = file_error(
            "vm1",
            from_wire(r#"{"result":"error","kind":"invalid","message":"cannot read /: is a directory"}"#),
        );
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        // Failures that are not the agent's answer keep their own mapping.
        assert_eq!(file_error("vm1", GuestError::Cancelled).code, ErrorCode::Cancelled);
        assert_eq!(file_error("vm1", GuestError::Closed).code, ErrorCode::GuestUnreachable);
    }

    #[test]
    fn a_hostile_message_reaches_the_caller_capped_and_escaped() {
        let message = "\\u001b[2J\\u202e".repeat(50_000);
        let e =
            guest_error("vm1", from_wire(&format!(r#"{{"result":"error","kind":"invalid","message":"{message}"}}"#)));
        assert!(e.message.len() < 4096, "{} bytes", e.message.len());
        assert!(!e.message.chars().any(|c| c.is_control() || c == '\u{202e}'), "{}", e.message);
    }

    #[test]
    fn the_error_chain_names_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such thing");
        let e = VmmError::Io { what: "reading x".into(), source: io };
        assert_eq!(error_chain(&e), "i/o error while reading x: no such thing");
        let api = vmm_error(e);
        assert_eq!((api.code, api.message.as_str()), (ErrorCode::Internal, "i/o error while reading x: no such thing"));
        // A cause the message already quotes is not repeated.
        let q = crate::vmm::qmp::QmpError::Connect(std::io::Error::other("refused"));
        let e = VmmError::Qmp { what: "pausing", source: q };
        assert_eq!(error_chain(&e), "pausing: cannot reach QEMU's control socket: refused");
    }
}
