//! Tool schemas in the form every MCP client accepts. schemars writes correct JSON Schema 2020-12, but some of
//! it trips real clients: `format: uint32` (not a JSON Schema format: opencode's validator warns once per
//! field, hundreds of lines), `type: ["integer", "null"]` (legal, but clients that map tool schemas onto a
//! single-`type` dialect, such as Gemini's function declarations, reject it; the MCP Inspector's portability
//! check warns), and enums spelled as `oneOf` of `const`s. `portable` rewrites a schema into the plainest
//! equivalent: what a caller may send (`Direction::Input`) or what a result may hold (`Direction::Output`).
use serde_json::{Map, Value};

/// Which side of a call the schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Parameters: an optional field may simply be left out (serde reads a missing `Option` as `None`), so
    /// its `null` branch is dropped.
    Input,
    /// Results: a `None` is sent as `null`, so nullability stays, spelled as `anyOf` of single types. Output
    /// schemas are for clients to validate structured results, not for the model's context: they carry no
    /// descriptions (docs/API.md has them).
    Output,
}

/// The formats JSON Schema 2020-12 defines; any other `format` is dropped.
const STANDARD_FORMATS: &[&str] = &[
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// Keywords that belong to the value's own branch when a nullable type is split into `anyOf` branches.
const BRANCH_KEYWORDS: &[&str] = &[
    "type",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "properties",
    "required",
    "additionalProperties",
    "enum",
];

/// The schema rewritten for MCP clients: no `$schema`/`title` noise at the top, only standard formats (an
/// unsigned integer keeps `minimum: 0`), no type arrays, no `default: null`, and enums as `enum` lists whose
/// values are described in the description.
pub fn portable(schema: schemars::Schema, direction: Direction) -> Map<String, Value> {
    let mut value = schema.to_value();
    if let Value::Object(root) = &mut value {
        root.remove("$schema");
        root.remove("title");
        // The tool's own description says it.
        root.remove("description");
    }
    rewrite(&mut value, direction);
    inline_enum_defs(&mut value);
    match value {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn rewrite(node: &mut Value, direction: Direction) {
    let Value::Object(map) = node else {
        if let Value::Array(items) = node {
            items.iter_mut().for_each(|v| rewrite(v, direction));
        }
        return;
    };
    // Children first, so a node sees its branches already rewritten.
    for (key, child) in map.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                if let Value::Object(members) = child {
                    members.values_mut().for_each(|v| rewrite(v, direction));
                }
            }
            "items" | "additionalProperties" | "anyOf" | "oneOf" | "allOf" | "not" | "prefixItems" | "contains" => {
                rewrite(child, direction)
            }
            _ => {}
        }
    }
    // `null`, `{}`, `[]` or a whole object of nulls as a default says only "optional", which leaving the
    // field out of `required` already says.
    if map.get("default").is_some_and(|d| d.is_null() || d.is_object() || d.as_array().is_some_and(Vec::is_empty)) {
        map.remove("default");
    }
    match direction {
        Direction::Output => {
            map.remove("description");
        }
        Direction::Input => {
            // The daemon refuses an unknown parameter itself, naming it with a hint in banger's terms; a
            // client that refused it first would say less.
            if map.get("additionalProperties") == Some(&Value::Bool(false)) {
                map.remove("additionalProperties");
            }
            // Doc comments wrap at 120 columns; a model reads one line as well.
            if let Some(Value::String(d)) = map.get_mut("description") {
                *d = d.split_whitespace().collect::<Vec<_>>().join(" ");
            }
        }
    }
    if let Some(Value::String(format)) = map.get("format") {
        if !STANDARD_FORMATS.contains(&format.as_str()) {
            let unsigned = format.starts_with("uint");
            map.remove("format");
            if unsigned && !map.contains_key("minimum") {
                map.insert("minimum".into(), Value::from(0));
            }
        }
    }
    split_type_array(map, direction);
    drop_null_branch(map, direction);
    consts_to_enum(map);
}

/// An enum in `$defs` is a type and a list of words: each `$ref` to it becomes the list itself (the property's
/// own description says what the words mean), and the definition goes.
fn inline_enum_defs(root: &mut Value) {
    let Some(Value::Object(defs)) = root.get("$defs").cloned() else { return };
    let enums: Map<String, Value> = defs
        .into_iter()
        .filter(|(_, d)| d.get("enum").is_some() && d.get("properties").is_none())
        .map(|(name, mut d)| {
            if let Value::Object(m) = &mut d {
                // The definition's description moves along only where the property has none.
                m.retain(|k, _| k == "type" || k == "enum" || k == "description");
            }
            (format!("#/$defs/{name}"), d)
        })
        .collect();
    fn replace(node: &mut Value, enums: &Map<String, Value>) {
        match node {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    if let Some(Value::Object(def)) = enums.get(r) {
                        m.remove("$ref");
                        for (k, v) in def {
                            if !m.contains_key(k) {
                                m.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                m.values_mut().for_each(|v| replace(v, enums));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| replace(v, enums)),
            _ => {}
        }
    }
    replace(root, &enums);
    if let Some(Value::Object(defs)) = root.get_mut("$defs") {
        defs.retain(|name, _| !enums.contains_key(&format!("#/$defs/{name}")));
        if defs.is_empty() {
            if let Value::Object(m) = root {
                m.remove("$defs");
            }
        }
    }
}

/// `type: ["x", "null"]`: for inputs `type: "x"`; for outputs `anyOf: [{type: "x", ...}, {type: "null"}]`.
fn split_type_array(map: &mut Map<String, Value>, direction: Direction) {
    let Some(Value::Array(types)) = map.get("type") else { return };
    let types: Vec<Value> = types.clone();
    let non_null: Vec<Value> = types.iter().filter(|t| t.as_str() != Some("null")).cloned().collect();
    let nullable = non_null.len() < types.len();
    if direction == Direction::Input && non_null.len() == 1 {
        map.insert("type".into(), non_null[0].clone());
        return;
    }
    let mut value_branch = Map::new();
    for key in BRANCH_KEYWORDS {
        if let Some(v) = map.remove(*key) {
            value_branch.insert(key.to_string(), v);
        }
    }
    let mut branches: Vec<Value> = non_null
        .into_iter()
        .map(|t| {
            let mut b = value_branch.clone();
            b.insert("type".into(), t);
            Value::Object(b)
        })
        .collect();
    if nullable && direction == Direction::Output {
        branches.push(serde_json::json!({"type": "null"}));
    }
    if branches.len() == 1 {
        if let Some(Value::Object(only)) = branches.pop() {
            map.extend(only);
        }
    } else {
        map.insert("anyOf".into(), Value::Array(branches));
    }
}

/// For inputs, `anyOf: [X, {type: "null"}]` becomes X itself (merged into this node).
fn drop_null_branch(map: &mut Map<String, Value>, direction: Direction) {
    if direction != Direction::Input {
        return;
    }
    for key in ["anyOf", "oneOf"] {
        let Some(Value::Array(branches)) = map.get(key) else { continue };
        let is_null = |b: &Value| {
            b.get("type").and_then(Value::as_str) == Some("null") && b.as_object().is_some_and(|o| o.len() == 1)
        };
        if !branches.iter().any(is_null) {
            continue;
        }
        let mut rest: Vec<Value> = branches.iter().filter(|b| !is_null(b)).cloned().collect();
        if rest.len() == 1 {
            map.remove(key);
            if let Some(Value::Object(only)) = rest.pop() {
                for (k, v) in only {
                    // The property's own description says more about it than its type's.
                    if k == "description" && map.contains_key("description") {
                        continue;
                    }
                    map.insert(k, v);
                }
            }
        } else {
            map.insert(key.into(), Value::Array(rest));
        }
    }
}

/// `oneOf` of string `const`s (an enum with documented variants) becomes `enum`, its values described.
fn consts_to_enum(map: &mut Map<String, Value>) {
    let Some(Value::Array(branches)) = map.get("oneOf") else { return };
    let mut values = vec![];
    let mut notes = vec![];
    for b in branches {
        // A variant is `const: "v"`, or `enum: ["v"]` (one value).
        let single = b.get("enum").and_then(Value::as_array).filter(|e| e.len() == 1).map(|e| &e[0]);
        let Some(Value::String(v)) = b.get("const").or(single) else { return };
        values.push(Value::String(v.clone()));
        if let Some(Value::String(d)) = b.get("description") {
            notes.push(format!("`{v}`: {d}"));
        }
    }
    map.remove("oneOf");
    map.insert("type".into(), Value::String("string".into()));
    map.insert("enum".into(), Value::Array(values));
    if !notes.is_empty() {
        let base = map.get("description").and_then(Value::as_str).unwrap_or_default().trim_end().to_string();
        let joined = notes.join("; ");
        let text = if base.is_empty() { joined } else { format!("{base} {joined}") };
        map.insert("description".into(), Value::String(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(schema: Value, direction: Direction) -> Value {
        let s: schemars::Schema = serde_json::from_value(schema).unwrap();
        Value::Object(portable(s, direction))
    }

    #[test]
    fn a_nullable_unsigned_field_becomes_a_plain_integer_for_inputs_and_an_any_of_for_outputs() {
        let field = json!({"type": "object", "title": "P", "$schema": "x", "properties": {
            "n": {"description": "d", "type": ["integer", "null"], "format": "uint32", "default": null, "maximum": 9}}});
        assert_eq!(
            run(field.clone(), Direction::Input),
            json!({"type": "object", "properties": {"n": {"description": "d", "type": "integer", "minimum": 0, "maximum": 9}}})
        );
        assert_eq!(
            run(field, Direction::Output),
            json!({"type": "object", "properties": {"n": {"anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}})
        );
    }

    #[test]
    fn an_optional_reference_is_the_reference_for_inputs_and_keeps_its_null_branch_for_outputs() {
        let s = json!({"properties": {"k": {"description": "which", "anyOf": [{"$ref": "#/$defs/K"}, {"type": "null"}], "default": null}},
            "$defs": {"K": {"description": "kinds", "oneOf": [
                {"type": "string", "const": "a", "description": "first"},
                {"type": "string", "const": "b", "description": "second"}]}}});
        assert_eq!(
            run(s.clone(), Direction::Input),
            json!({"properties": {"k": {"description": "which", "type": "string", "enum": ["a", "b"]}}})
        );
        let out = run(s, Direction::Output);
        assert_eq!(out["properties"]["k"]["anyOf"], json!([{"type": "string", "enum": ["a", "b"]}, {"type": "null"}]));
        assert!(out.get("$defs").is_none(), "{out}");
    }

    #[test]
    fn standard_formats_and_signed_integers_are_kept_as_they_are() {
        let s = json!({"properties": {"t": {"type": "string", "format": "date-time"}, "i": {"type": "integer", "format": "int64"}}});
        assert_eq!(
            run(s, Direction::Input),
            json!({"properties": {"t": {"type": "string", "format": "date-time"}, "i": {"type": "integer"}}})
        );
    }
}
