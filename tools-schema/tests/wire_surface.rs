//! Freezes banger's public wire surface. A change to any operation, parameter, result or description shows
//! up here as a snapshot diff that has to be accepted on purpose (`cargo insta review`), so the MCP tools
//! and JSON-RPC methods agents depend on never change by accident.
use tools_schema::ops::OPERATIONS;

#[test]
fn operation_schemas_are_frozen() {
    let surface: Vec<serde_json::Value> = OPERATIONS
        .iter()
        .map(|op| {
            serde_json::json!({
                "method": op.method,
                "tool": op.tool_name(),
                "description": op.description,
                "read_only": op.read_only,
                "destructive": op.destructive,
                "idempotent": op.idempotent,
                "params": (op.params_schema)(),
                "result": (op.result_schema)(),
            })
        })
        .collect();
    insta::assert_json_snapshot!("operations", surface);
}

#[test]
fn every_operation_is_well_formed() {
    let mut seen = std::collections::HashSet::new();
    for op in OPERATIONS {
        assert!(seen.insert(op.method), "{} listed twice", op.method);
        let (group, verb) = op.method.split_once('.').expect("methods are group.verb");
        assert!(!group.is_empty() && !verb.is_empty());
        assert!(op.description.len() > 30, "{} needs a description an agent can act on", op.method);
        assert!(!(op.read_only && op.destructive), "{} cannot be read-only and destructive", op.method);
        for schema in [(op.params_schema)(), (op.result_schema)()] {
            assert_eq!(
                schema.get("type"),
                Some(&serde_json::json!("object")),
                "{}: MCP needs object schemas",
                op.method
            );
        }
    }
}

#[test]
fn the_api_reference_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/API.md");
    let fresh = tools_schema::doc::api_reference();
    if std::env::var_os("BANGER_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == fresh, "docs/API.md is stale: run `BANGER_UPDATE_DOCS=1 cargo test -p tools-schema`");
}
