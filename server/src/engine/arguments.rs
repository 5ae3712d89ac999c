//! A call's arguments that do not decode or do not pass their checks: the error names the argument and what
//! is wrong with it, and where a nearby call would work (a misspelt parameter, `"2G"` for a number of MiB, a
//! value just out of range) the error's next step is that call, ready to make. The caller's own arguments are
//! kept; only the one at fault changes, and the repaired call is checked to decode before it is offered.
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tools_schema::ops::OperationSpec;
use tools_schema::ApiError;

/// What every argument error's hint says (the schema is where ranges and shapes are written down).
const SCHEMA_HINT: &str =
    "the tool's input schema (MCP tools/list, or docs/API.md) gives every parameter and its range";

/// Decodes an operation's arguments; a failure says which argument and why, with a repaired call as the next
/// step when there is one.
pub(crate) fn decode<T: DeserializeOwned>(method: &str, params: Value) -> Result<T, ApiError> {
    let original = params.clone();
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let detail = if path == "." { e.into_inner().to_string() } else { format!("{path}: {}", e.into_inner()) };
        let err = ApiError::invalid(format!("invalid arguments: {detail}")).with_hint(SCHEMA_HINT);
        let repaired = OperationSpec::by_method(method)
            .and_then(|op| repair(&original, &(op.params_schema)().to_value()))
            .filter(|(args, _)| decodes(method, args));
        match repaired {
            Some((args, why)) => err.with_next(method, args, why),
            None => err,
        }
    })
}

/// A checked argument out of range (`validate` failed): the same call with `fixed` (the arguments with the
/// value that would pass) as the next step, when that decodes.
pub(crate) fn invalid(method: &str, message: String, fixed: Option<(Value, String)>) -> ApiError {
    let err = ApiError::invalid(message).with_hint(SCHEMA_HINT);
    match fixed.filter(|(args, _)| decodes(method, args)) {
        Some((args, why)) => err.with_next(method, args, why),
        None => err,
    }
}

/// The arguments of a call as JSON, without the fields left unset, so a repaired call reads as the caller
/// wrote it.
pub(crate) fn as_arguments(params: &impl serde::Serialize) -> Value {
    fn strip(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null() && v != &Value::Object(Map::new()))
                    .map(|(k, v)| (k, strip(v)))
                    .collect(),
            ),
            other => other,
        }
    }
    strip(serde_json::to_value(params).unwrap_or(Value::Null))
}

/// For an argument that must be an absolute host path and is not: the same call with a placeholder the caller
/// fills in (the daemon cannot know what a relative path was relative to).
pub(crate) fn absolute_path_fix(args: Value, field: &str, given: &str) -> Option<(Value, String)> {
    if given.starts_with('/') {
        return None;
    }
    let mut args = args;
    args.as_object_mut()?
        .insert(field.into(), Value::from(format!("<absolute path of `{given}` on the daemon's host>")));
    Some((args, format!("the same call with {field} as an absolute path")))
}

/// A create's vcpus and memory out of range: the same call with them in range.
pub(crate) fn create_in_range(
    params: &tools_schema::vm::VmCreateParams,
    wrap: impl Fn(Value) -> Value,
) -> Option<(Value, String)> {
    let fixed = params.within_range();
    (fixed != *params).then(|| (wrap(as_arguments(&fixed)), "the same call with vcpus and memory_mib in range".into()))
}

/// An error about one argument of a call (a path that is no repository): the same call with that argument
/// as a placeholder for the caller to fill in, as its next step.
pub(crate) fn retry_with(e: ApiError, method: &str, args: Value, field: &str, placeholder: &str) -> ApiError {
    let mut args = args;
    let Some(object) = args.as_object_mut() else { return e };
    object.insert(field.into(), Value::from(placeholder));
    if !decodes(method, &args) {
        return e;
    }
    e.with_next(method, args, format!("the same call with another {field}"))
}

fn decodes(method: &str, args: &Value) -> bool {
    OperationSpec::by_method(method).is_some_and(|op| (op.check_params)(args).is_ok())
}

/// The caller's arguments mended against the operation's input schema, read structurally (never from the
/// decoder's message): a parameter the schema does not have is renamed to the one meant (or dropped), and a
/// number written as text (`"2G"` for a field in MiB) becomes the number. None when nothing was mended.
fn repair(original: &Value, schema: &Value) -> Option<(Value, String)> {
    let mut fixed = original.clone();
    let mut changes = vec![];
    mend(&mut fixed, schema, schema, &mut changes);
    (!changes.is_empty()).then(|| (fixed, format!("the same call with {}", changes.join(", "))))
}

fn mend(args: &mut Value, node: &Value, root: &Value, changes: &mut Vec<String>) {
    let node = resolve(node, root);
    let (Some(object), Some(properties)) = (args.as_object_mut(), node.get("properties").and_then(Value::as_object))
    else {
        return;
    };
    let known: Vec<String> = properties.keys().cloned().collect();
    let unknown: Vec<String> = object.keys().filter(|k| !properties.contains_key(*k)).cloned().collect();
    for key in unknown {
        let value = object.remove(&key).unwrap_or(Value::Null);
        match closest(&key, &known) {
            Some(meant) if !object.contains_key(meant) => {
                object.insert(meant.to_string(), value);
                changes.push(format!("`{key}` as `{meant}`"));
            }
            _ => changes.push(format!("no `{key}` (it takes no such parameter)")),
        }
    }
    for (key, value) in object.iter_mut() {
        let Some(field) = properties.get(key).map(|f| resolve(f, root)) else { continue };
        if let (Value::String(text), true) = (&*value, is_integer(field)) {
            if let Some(n) = as_number(key, text) {
                changes.push(format!("{key} as the number {n}"));
                *value = Value::from(n);
            }
            continue;
        }
        mend(value, field, root, changes);
    }
}

/// The schema a node stands for: through `$ref`, and past an optional's `anyOf [T, null]`.
fn resolve<'a>(node: &'a Value, root: &'a Value) -> &'a Value {
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let target = r.strip_prefix("#/").and_then(|p| p.split('/').try_fold(root, |at, k| at.get(k)));
        return target.map(|t| resolve(t, root)).unwrap_or(node);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(options) = node.get(key).and_then(Value::as_array) {
            if let Some(first) = options.iter().find(|o| o.get("type").and_then(Value::as_str) != Some("null")) {
                return resolve(first, root);
            }
        }
    }
    node
}

fn is_integer(node: &Value) -> bool {
    match node.get("type") {
        Some(Value::String(t)) => t == "integer",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
        _ => false,
    }
}

/// A number given as text: `"2048"`, or a size with a unit for a field counted in MiB or GiB (`"2G"`).
fn as_number(field: &str, text: &str) -> Option<u64> {
    if let Ok(n) = text.trim().parse::<u64>() {
        return Some(n);
    }
    let unit_mib = if field.ends_with("_mib") {
        1
    } else if field.ends_with("_gib") {
        1024
    } else {
        return None;
    };
    tools_schema::vm::parse_size(text, unit_mib)
}

/// The known name the caller most likely meant: one containing the other (`memory` for `memory_mib`), or
/// within a small edit distance.
fn closest<'a>(unknown: &str, known: &'a [String]) -> Option<&'a str> {
    let lower = unknown.to_ascii_lowercase();
    let contained = known.iter().filter(|k| k.contains(&lower) || lower.contains(k.as_str())).collect::<Vec<_>>();
    if let [one] = contained.as_slice() {
        return Some(one);
    }
    known
        .iter()
        .map(|k| (strsim::levenshtein(&lower, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tools_schema::vm::VmCreateParams;

    fn next_of(r: Result<VmCreateParams, ApiError>) -> (String, Value) {
        let e = r.unwrap_err();
        assert_eq!(e.next.len(), 1, "{e:?}");
        (e.message, Value::Object(e.next[0].arguments.clone()))
    }

    #[test]
    fn a_misspelt_parameter_is_offered_under_its_name_and_other_arguments_are_kept() {
        let (m, args) = next_of(decode("vm.create", json!({"name": "dev", "memory": 1024})));
        assert!(m.contains("unknown field `memory`"), "{m}");
        assert_eq!(args, json!({"name": "dev", "memory_mib": 1024}));
        let (_, args) = next_of(decode("vm.create", json!({"name": "dev", "vcpu": 2})));
        assert_eq!(args, json!({"name": "dev", "vcpus": 2}));
        let (_, args) = next_of(decode("vm.create", json!({"name": "dev", "colour": "red"})));
        assert_eq!(args, json!({"name": "dev"}), "a parameter like none is dropped");
    }

    #[test]
    fn a_size_given_as_text_is_offered_as_the_number_the_field_counts() {
        let (m, args) = next_of(decode("vm.create", json!({"memory_mib": "2G"})));
        assert!(m.contains("memory_mib") && m.contains("2G"), "{m}");
        assert_eq!(args, json!({"memory_mib": 2048}));
        assert_eq!(next_of(decode("vm.create", json!({"memory_mib": "512MiB"}))).1, json!({"memory_mib": 512}));
        assert_eq!(next_of(decode("vm.create", json!({"vcpus": "2"}))).1, json!({"vcpus": 2}));
        let e = decode::<VmCreateParams>("vm.create", json!({"memory_mib": "lots"})).unwrap_err();
        assert!(e.next.is_empty() && e.hint.is_some(), "no guess for what cannot be read: {e:?}");
    }

    #[test]
    fn a_nested_fault_is_mended_where_it_is() {
        let e = decode::<tools_schema::workspace::VmRunParams>(
            "vm.run",
            json!({"path": "/src/app", "create": {"memory": 512}}),
        )
        .unwrap_err();
        assert_eq!(
            Value::Object(e.next[0].arguments.clone()),
            json!({"path": "/src/app", "create": {"memory_mib": 512}})
        );
    }
}
