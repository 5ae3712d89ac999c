//! An error's next step (`tools_schema::error::NextStep`) as a human at a terminal takes it: a `banger`
//! command line. The daemon names operations and arguments; only the CLI knows its own syntax, so the
//! rendering lives here, and `cli`'s tests parse every line it makes with the CLI's own argument parser.
use serde_json::{Map, Value};
use tools_schema::error::NextStep;

/// A word as a POSIX shell reads it back: bare when it is plain, else single-quoted.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b)) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The `banger` command line of a next step; a step the CLI has no command for is shown as the JSON-RPC
/// call it is.
pub fn command_line(step: &NextStep) -> String {
    match words(&step.method, &step.arguments) {
        Some(words) => std::iter::once("banger".to_string())
            .chain(words.iter().map(|w| shell_quote(w)))
            .collect::<Vec<_>>()
            .join(" "),
        None => format!("JSON-RPC {}", step.as_method_call()),
    }
}

/// The command's words after `banger`, for the operations errors suggest.
fn words(method: &str, args: &Map<String, Value>) -> Option<Vec<String>> {
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let list = |k: &str| -> Vec<String> {
        match args.get(k) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => vec![],
        }
    };
    let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(false);
    let number = |k: &str| args.get(k).and_then(Value::as_u64).map(|n| n.to_string());
    let mut w: Vec<String> = vec![];
    let mut push = |words: &[&str]| w.extend(words.iter().map(|s| s.to_string()));
    match method {
        "vm.list" => push(&["vm", "list"]),
        "vm.show" | "vm.logs" | "vm.ssh" | "vm.ports" | "vm.stats" => {
            push(&["vm", &method[3..], &text("vm")?]);
        }
        "vm.start" | "vm.stop" | "vm.restart" | "vm.kill" | "vm.delete" => {
            push(&["vm", &method[3..]]);
            w.extend(list("vm"));
        }
        "vm.exec" => {
            push(&["vm", "exec", &text("vm")?]);
            if let Some(cwd) = text("cwd") {
                push(&["--cwd", &cwd]);
            }
            push(&["--"]);
            w.extend(list("command"));
        }
        "vm.create" | "vm.run" => {
            let create = if method == "vm.run" { args.get("create").and_then(Value::as_object) } else { Some(args) };
            push(&["vm", &method[3..]]);
            if method == "vm.run" {
                push(&[&text("path")?]);
            }
            let create = create.cloned().unwrap_or_default();
            for (key, flag_name) in [("name", "--name"), ("image", "--image")] {
                if let Some(v) = create.get(key).and_then(Value::as_str) {
                    push(&[flag_name, v]);
                }
            }
            for (key, flag_name) in [("vcpus", "--vcpus"), ("memory_mib", "--memory")] {
                if let Some(v) = create.get(key).and_then(Value::as_u64) {
                    push(&[flag_name, &v.to_string()]);
                }
            }
        }
        "session.list" => {
            push(&["vm", "session", "list"]);
            w.extend(text("vm"));
        }
        "session.logs" | "session.show" | "session.stop" | "session.kill" => {
            push(&["vm", "session", &method[8..], &text("session")?]);
            if let Some(vm) = text("vm") {
                push(&["--vm", &vm]);
            }
        }
        "session.start" => {
            push(&["vm", "session", "start", &text("vm")?]);
            if let Some(cwd) = text("cwd") {
                push(&["--cwd", &cwd]);
            }
            push(&["--"]);
            w.extend(list("command"));
        }
        "workspace.prepare" => {
            push(&["vm", "workspace", "prepare", &text("vm")?, &text("path")?]);
            if flag("force") {
                push(&["--force"]);
            }
            if text("mode").as_deref() == Some("full") {
                push(&["--full"]);
            }
        }
        "workspace.export" => {
            push(&["vm", "workspace", "export", &text("vm")?]);
            if let Some(repo) = text("check_repo") {
                push(&["--check", &repo]);
            }
            if flag("delete") {
                push(&["--delete"]);
            }
        }
        "image.list" => push(&["image", "list"]),
        "image.show" | "image.delete" | "image.promote" => push(&["image", &method[6..], &text("image")?]),
        "image.warm" => {
            push(&["image", "warm"]);
            w.extend(text("image"));
            if let Some(v) = number("vcpus") {
                w.extend(["--vcpus".to_string(), v]);
            }
            if let Some(m) = number("memory_mib") {
                w.extend(["--memory".to_string(), m]);
            }
            if flag("rebuild") {
                w.push("--rebuild".into());
            }
        }
        "image.register" => {
            push(&["image", "register"]);
            for (key, flag_name) in
                [("name", "--name"), ("kernel", "--kernel"), ("initrd", "--initrd"), ("rootfs", "--rootfs")]
            {
                if let Some(v) = text(key) {
                    w.extend([flag_name.to_string(), v]);
                }
            }
            if flag("make_default") {
                w.push("--default".into());
            }
        }
        "doctor.run" => push(&["doctor"]),
        "daemon.status" => push(&["daemon", "status"]),
        "operation.list" => push(&["operation", "list"]),
        _ => return None,
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_read_as_the_commands_a_human_would_type() {
        let line = |m: &str, a: Value| command_line(&NextStep::new(m, a, "why"));
        assert_eq!(line("vm.list", json!({})), "banger vm list");
        assert_eq!(line("vm.logs", json!({"vm": "dev"})), "banger vm logs dev");
        assert_eq!(line("vm.delete", json!({"vm": ["a", "b"]})), "banger vm delete a b");
        assert_eq!(
            line("vm.exec", json!({"vm": "dev", "command": ["git", "-C", "/root/repo", "log", "-1"]})),
            "banger vm exec dev -- git -C /root/repo log -1"
        );
        assert_eq!(
            line("workspace.prepare", json!({"vm": "dev", "path": "/src/my app", "force": true})),
            "banger vm workspace prepare dev '/src/my app' --force"
        );
        assert_eq!(line("session.logs", json!({"session": "s", "vm": "dev"})), "banger vm session logs s --vm dev");
        assert_eq!(
            line("vm.create", json!({"name": "dev", "memory_mib": 128})),
            "banger vm create --name dev --memory 128"
        );
        assert_eq!(line("operation.status", json!({"id": "x"})), r#"JSON-RPC operation.status {"id":"x"}"#);
    }
}
