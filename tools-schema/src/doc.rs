//! The JSON-RPC/MCP reference (docs/API.md), generated from the operation list and schemas so it cannot
//! drift from the code. `cargo test -p tools-schema` fails when the committed file is stale;
//! `BANGER_UPDATE_DOCS=1 cargo test -p tools-schema` rewrites it.
use crate::ops::OPERATIONS;

pub fn api_reference() -> String {
    let mut out = String::from(
        "# banger API reference\n\n\
         Generated from `tools-schema` (do not edit by hand: `BANGER_UPDATE_DOCS=1 cargo test -p tools-schema`).\n\n\
         Every operation is a JSON-RPC 2.0 method on the daemon socket and an MCP tool of the same name with `.`\n\
         replaced by `_` (`vm.create` is the tool `vm_create` and the CLI command `banger vm create`).\n\
         Errors carry `error.data` = `{code, message, hint, next}` on JSON-RPC, and the same object as the\n\
         JSON text of an `isError` result on MCP (where the hint ends with the next steps as tool calls). `next`\n\
         lists the operations that would help, each `{tool, method, arguments, why}`, ready to call. Error\n\
         codes: `invalid_argument`, `not_found`, `already_exists`, `failed_precondition`, `busy`,\n\
         `guest_unreachable`, `host_unsupported`, `timeout`, `cancelled`, `permission_denied`,\n\
         `resource_exhausted`, `unknown_method`, `internal`.\n\n\
         | method | MCP tool | read-only | destructive | idempotent |\n|---|---|---|---|---|\n",
    );
    for op in OPERATIONS {
        out.push_str(&format!(
            "| [`{}`](#{}) | `{}` | {} | {} | {} |\n",
            op.method,
            op.method.replace('.', ""),
            op.tool_name(),
            yes(op.read_only),
            yes(op.destructive),
            yes(op.idempotent)
        ));
    }
    for op in OPERATIONS {
        out.push_str(&format!("\n## {}\n\n{}\n\n", op.method, op.description));
        let params = serde_json::to_string_pretty(&(op.params_schema)()).expect("schema serialises");
        let result = serde_json::to_string_pretty(&(op.result_schema)()).expect("schema serialises");
        out.push_str(&format!(
            "<details><summary>params schema</summary>\n\n```json\n{params}\n```\n</details>\n\n\
             <details><summary>result schema</summary>\n\n```json\n{result}\n```\n</details>\n"
        ));
    }
    out.push_str(
        "\n## JSON-RPC subscriptions\n\n\
         These stream, so they exist on JSON-RPC over WebSocket only (MCP clients follow output with\n\
         `session.logs` and `wait_ms`). Subscribe with the method, receive notifications, end with the\n\
         unsubscribe method or by disconnecting.\n\n\
         | subscribe | notification | unsubscribe |\n|---|---|---|\n",
    );
    for (method, notification, unsubscribe, _) in crate::session::SUBSCRIPTIONS {
        out.push_str(&format!("| `{method}` | `{notification}` | `{unsubscribe}` |\n"));
    }
    for (method, _, _, description) in crate::session::SUBSCRIPTIONS {
        out.push_str(&format!("\n### {method}\n\n{description}\n"));
    }
    let params = serde_json::to_string_pretty(&schemars::schema_for!(crate::session::SessionFollowParams))
        .expect("schema serialises");
    let event =
        serde_json::to_string_pretty(&schemars::schema_for!(crate::session::SessionEvent)).expect("schema serialises");
    out.push_str(&format!(
        "\n<details><summary>subscription params schema</summary>\n\n```json\n{params}\n```\n</details>\n\n\
         <details><summary>notification schema</summary>\n\n```json\n{event}\n```\n</details>\n"
    ));
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
