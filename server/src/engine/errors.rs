//! The engine's error mapping: what each internal error (`VmmError`, `GuestError`, `StoreError`) means to the
//! caller, as an `ApiError` with a code and a hint. Every module of the engine maps through here, so none has
//! to import another for it (warm/ and vm/ both use this file, not each other).
//!
//! Nothing here reads an error's text to decide what it is: VMM errors by variant, the agent's by its
//! `GuestErrorKind` (the guest's message is untrusted and already capped and escaped by `GuestError::agent`).
use serde_json::json;
use tools_schema::guest::GuestErrorKind;
use tools_schema::{ApiError, ErrorCode};

use crate::guest::GuestError;
use crate::store::StoreError;
use crate::vmm::VmmError;

/// Hints many errors share. Prefer a hint of the error's own; these are for failures where nothing more
/// specific is true.
pub(crate) mod hint {
    /// A failure of the host or the daemon, not of the request: where its details are.
    pub(crate) const DAEMON_LOG: &str =
        "the daemon log has the details: `journalctl -u bangerd`, or bangerd.log in the state directory";
    /// Something only a bug in banger can cause (a task that panicked, a result that cannot be encoded).
    pub(crate) const BUG: &str = "this is a bug in banger: please report it with the daemon log (`journalctl -u \
                                  bangerd`, or bangerd.log in the state directory)";
    /// The daemon could not make or change its own files.
    pub(crate) const STATE_DIR: &str = "check free space and permissions of the daemon's state directory \
                                        (daemon status shows where it is)";
    /// Arguments out of range or of the wrong shape.
    pub(crate) const SCHEMA: &str = "the operation's schema (MCP tools/list, or docs/API.md) gives every field's range";
    /// The caller (or its connection) cancelled.
    pub(crate) const RUN_AGAIN: &str = "nothing more was done; run it again to retry";
}

pub(crate) fn vmm_error(e: VmmError) -> ApiError {
    match e {
        VmmError::MissingBinary { .. } => ApiError::new(ErrorCode::HostUnsupported, e.to_string())
            .with_hint("run scripts/setup-host.sh on the daemon's host")
            .with_next("doctor.run", json!({}), "checks every host prerequisite"),
        // Their messages carry the VMM's own answer (or the program's output) already.
        VmmError::Launch { .. }
        | VmmError::Io { .. }
        | VmmError::Qmp { .. }
        | VmmError::Firecracker { .. }
        | VmmError::Guest(_) => ApiError::internal(error_chain(&e))
            .with_hint("the VMM failed on the daemon's host")
            .with_next("doctor.run", json!({}), "checks the host set-up"),
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
        GuestError::Agent { kind: GuestErrorKind::NotFound, message } => ApiError::not_found(message)
            .with_hint("check the path in the guest")
            .with_next("vm.exec", json!({"vm": vm, "command": ["ls", "-la", "<folder>"]}), "lists what is there"),
        GuestError::Agent { message, .. } => ApiError::invalid(message)
            .with_hint("check the path and its permissions in the guest")
            .with_next("vm.exec", json!({"vm": vm, "command": ["ls", "-ld", "<path>"]}), "shows its type and mode"),
        other => guest_error(vm, other),
    }
}

/// A guest call's failure as the caller's error. An agent's error is mapped by its kind alone.
pub(crate) fn guest_error(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Cancelled => {
            ApiError::new(ErrorCode::Cancelled, "cancelled by the caller").with_hint(hint::RUN_AGAIN)
        }
        GuestError::Timeout(_) => ApiError::new(ErrorCode::Timeout, format!("VM {vm}: {e}"))
            .with_hint("the guest may be overloaded or hung")
            .with_next("vm.logs", json!({"vm": vm}), "shows the guest console"),
        GuestError::Agent { kind, message } => agent_error(vm, kind, message),
        other => ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: {}", error_chain(&other)))
            .with_hint("the guest agent does not answer")
            .with_next("vm.logs", json!({"vm": vm}), "shows the guest console")
            .with_next("vm.restart", json!({"vm": vm}), "reboots the VM"),
    }
}

/// What each kind of agent error means to the caller, with what to do next.
fn agent_error(vm: &str, kind: GuestErrorKind, message: String) -> ApiError {
    match kind {
        GuestErrorKind::NotFound => ApiError::not_found(message).with_hint("no such session in this VM").with_next(
            "session.list",
            json!({"vm": vm}),
            "lists the VM's sessions",
        ),
        GuestErrorKind::Invalid => ApiError::invalid(message).with_hint("fix the request's arguments and try again"),
        GuestErrorKind::ProgramMissing => ApiError::invalid(message)
            .with_hint(
                "the VM's image lacks that program: install it in the guest (apt-get install ...), or create the \
                 VM from an image that provides it",
            )
            .with_next("image.list", json!({}), "says what each image provides (python3, node, the coding agents...)"),
        GuestErrorKind::CwdMissing => ApiError::invalid(message)
            .with_hint("give an existing directory as cwd, or make it first")
            .with_next("vm.exec", json!({"vm": vm, "command": ["mkdir", "-p", "<dir>"]}), "makes the directory"),
        GuestErrorKind::CannotRun => ApiError::invalid(message)
            .with_hint("the program is there but could not be started (its interpreter or libraries?)")
            .with_next("vm.exec", json!({"vm": vm, "command": ["ls", "-l", "<program>"]}), "shows the file"),
        GuestErrorKind::BadOffset => {
            ApiError::invalid(message).with_hint("continue from the next_offset of the previous read, or from 0")
        }
        GuestErrorKind::InputClosed => {
            ApiError::precondition(message).with_hint("the session's stdin is closed: it ended or closed it")
        }
        GuestErrorKind::Other => {
            ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: the guest agent reported: {message}"))
                .with_hint("the guest agent failed")
                .with_next("vm.logs", json!({"vm": vm}), "shows the guest console")
                .with_next("vm.restart", json!({"vm": vm}), "reboots the VM")
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

    /// Just past the `)` matching the `(` at `open`, skipping string and char literals.
    fn call_end(bytes: &[u8], open: usize) -> usize {
        let (mut depth, mut i) = (0usize, open);
        while i < bytes.len() {
            match bytes[i] {
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                }
                b'\'' if bytes.get(i + 2) == Some(&b'\'') => i += 2,
                _ => {}
            }
            i += 1;
        }
        i + 1
    }

    /// The argument text of every `.with_hint(...)` in `code`, as `(line, text)`.
    fn hint_texts(code: &str) -> Vec<(usize, String)> {
        code.match_indices(".with_hint(")
            .map(|(at, m)| {
                let open = at + m.len() - 1;
                let end = call_end(code.as_bytes(), open).min(code.len());
                (code[..at].matches('\n').count() + 1, code[open..end].to_string())
            })
            .collect()
    }

    /// Whether a hint's text names a `banger` command (which an MCP agent does not have): the command goes
    /// in a next step (`with_next`), which each front door renders in its caller's terms.
    fn names_a_cli_command(hint: &str) -> bool {
        ["vm", "image", "daemon", "doctor", "operation", "mcp"].iter().any(|c| hint.contains(&format!("banger {c}")))
            || hint.contains("--")
    }

    #[test]
    fn the_cli_command_check_sees_commands_in_hints() {
        let code = "ApiError::invalid(m)\n    .with_hint(format!(\"`banger vm logs {vm}` (a) shows it\"))\n\
                    e.with_hint(\"choose another --name\")\ne.with_hint(\"stop it first\")";
        let found: Vec<bool> = hint_texts(code).iter().map(|(_, t)| names_a_cli_command(t)).collect();
        assert_eq!(found, [true, true, false]);
    }

    /// No hint the daemon writes names a `banger` command or flag: an MCP agent has neither, so a command is
    /// a next step (`ApiError::with_next`), shown as a tool call over MCP and as a command line in the CLI.
    #[test]
    fn no_hint_names_a_cli_command() {
        let mut offenders = vec![];
        for (path, code) in crate::source_scan::daemon_sources("src") {
            for (line, text) in hint_texts(&code) {
                if names_a_cli_command(&text) {
                    offenders.push(format!("{}:{line}: {}", path.display(), text.lines().next().unwrap_or_default()));
                }
            }
        }
        assert!(offenders.is_empty(), "hints naming CLI commands (make them next steps):\n{}", offenders.join("\n"));
    }

    /// Constructors of `ApiError` (called, or passed as a function) in `code` that are not followed by
    /// `.with_hint(`, and struct literals with `hint: None`, as `(line, text)`. String literals are skipped
    /// when matching parentheses, so a `(` inside a message cannot hide a missing hint.
    fn unhinted(code: &str) -> Vec<(usize, String)> {
        const CONSTRUCTORS: [&str; 5] = ["new", "invalid", "not_found", "precondition", "internal"];
        let bytes = code.as_bytes();
        let mut found = vec![];
        let line_of = |at: usize| code[..at].matches('\n').count() + 1;
        let mut from = 0;
        while let Some(at) = code[from..].find("ApiError::").map(|i| from + i) {
            from = at + "ApiError::".len();
            let name: String = code[from..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !CONSTRUCTORS.contains(&name.as_str()) {
                continue;
            }
            let mut end = from + name.len();
            if bytes.get(end) == Some(&b'(') {
                end = call_end(bytes, end);
                if code[end.min(code.len())..].trim_start().starts_with(".with_hint(") {
                    continue;
                }
            }
            found.push((line_of(at), code[at..end.min(code.len())].lines().next().unwrap_or_default().to_string()));
        }
        for (n, line) in code.lines().enumerate() {
            if line.split("//").next().unwrap_or_default().contains("hint: None") {
                found.push((n + 1, line.trim().to_string()));
            }
        }
        found
    }

    #[test]
    fn the_hint_check_sees_every_unhinted_error() {
        let bad = [
            "return Err(ApiError::internal(format!(\"creating {}: {e}\", dir.display())));",
            "p.validate().map_err(ApiError::invalid)?;",
            "Err(ApiError::new(ErrorCode::Cancelled, \"cancelled (by you)\"))",
            "let e = ApiError::not_found(\")\");\nlet hint = e.with_hint(\"late\");",
            "ApiError { code, message, hint: None }",
        ];
        for code in bad {
            assert_eq!(unhinted(code).len(), 1, "missed: {code}");
        }
        let fine = [
            "Err(ApiError::internal(format!(\"a (b) {x}\", x = f(y))).with_hint(\"do this\"))",
            "ApiError::invalid(m)\n    .with_hint(format!(\"`banger vm logs {vm}`\"))",
            "fn f(e: ApiError) -> ApiError { e }",
            "if e.code == ErrorCode::NotFound { ApiError::from(e) }",
        ];
        for code in fine {
            assert_eq!(unhinted(code), vec![], "flagged: {code}");
        }
    }

    /// Every error the daemon makes says what to do next (`ApiError::hint`): each `ApiError::new`, `invalid`,
    /// `not_found`, `precondition` and `internal` in the daemon's sources (unit tests aside) is followed by
    /// `.with_hint(...)`. A constructor passed as a function (`map_err(ApiError::invalid)`) cannot be, so it
    /// fails too; write a closure with a hint instead.
    #[test]
    fn every_error_the_daemon_makes_carries_a_hint() {
        let sources = crate::source_scan::daemon_sources("src");
        let mut offenders = vec![];
        for (path, code) in &sources {
            for (line, what) in unhinted(code) {
                offenders.push(format!("{}:{line}: {what}", path.display()));
            }
        }
        assert!(sources.len() > 30, "found only {} daemon sources", sources.len());
        assert!(offenders.is_empty(), "errors without a hint (add .with_hint(...)):\n{}", offenders.join("\n"));
    }

    /// Whether `line` (comments aside) reads an error's text to decide something: `.contains(`,
    /// `.starts_with(` or `.ends_with(` on a name errors and messages go by (`m`, `message`, `why`, `e`,
    /// `err`, `stderr`, ..., or their `.message` / `.to_string()`).
    fn classifies_by_text(line: &str) -> bool {
        const NAMES: [&str; 11] =
            ["m", "msg", "message", "why", "reason", "detail", "e", "err", "error", "stderr", "text"];
        let code = line.split("//").next().unwrap_or_default();
        ["contains(", "starts_with(", "ends_with("].iter().any(|method| {
            code.match_indices(&format!(".{method}")).any(|(at, _)| {
                let before = code[..at].trim_end_matches(".message").trim_end_matches(".to_string()");
                let name: String =
                    before.chars().rev().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
                let name: String = name.chars().rev().collect();
                NAMES.contains(&name.as_str())
            })
        })
    }

    #[test]
    fn the_text_check_sees_classification_by_message() {
        for bad in [
            r#"GuestError::Agent(m) if m.contains("No such file") => ApiError::not_found(m),"#,
            r#"Err(why) if why.starts_with("no template") => None,"#,
            r#"if e.message.contains("closed") {"#,
            r#"if err.to_string().ends_with("refused") {"#,
        ] {
            assert!(classifies_by_text(bad), "missed: {bad}");
        }
        for fine in [
            r#"let loopback = l.address.starts_with("127.") || l.address == "::1";"#,
            r#"if !out.ends_with(&text) {"#,
            r#"// m.contains("x") in a comment"#,
        ] {
            assert!(!classifies_by_text(fine), "flagged: {fine}");
        }
    }

    /// No error in the daemon is told apart by its text: guest errors go by `GuestErrorKind`, VMM errors by
    /// variant, template misses by `TemplateMiss`.
    #[test]
    fn nothing_in_the_daemon_is_classified_by_its_text() {
        let mut offenders = vec![];
        for (path, code) in crate::source_scan::daemon_sources("src") {
            for (n, line) in code.lines().enumerate() {
                if classifies_by_text(line) {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(offenders.is_empty(), "decide by a kind or a variant, not the text:\n{}", offenders.join("\n"));
    }

    #[test]
    fn agent_errors_map_by_kind_never_by_text() {
        // Each message says the opposite of its kind: only the kind may decide.
        let cases = [
            ("not_found", "cannot run it: stopped reading", ErrorCode::NotFound),
            ("invalid", "No such file or directory", ErrorCode::InvalidArgument),
            ("cannot_run", "no session `x` in the guest", ErrorCode::InvalidArgument),
            ("program_missing", "offset 3 is past the end", ErrorCode::InvalidArgument),
            ("cwd_missing", "no session `y`", ErrorCode::InvalidArgument),
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
