//! No import circles between the modules of the CLI, the guest agent and the daemon's engine: a module that
//! needs something of a sibling that needs it back means the shared part belongs in a third module (the CLI's
//! `args.rs`, the agent's `channel.rs`, the engine's `errors.rs` and `disks.rs` were made that way). Reads the sources; no
//! daemon or guest is involved.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The identifiers a path prefix reaches in `code`: `prefix::a::...` gives `a`, `prefix::{a::x, b}` gives both.
fn reached(code: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = vec![];
    for (i, _) in code.match_indices(prefix) {
        // `super::super::x` is not `super::x` of the inner module.
        if prefix == "super::" && code[..i].ends_with("super::") {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(ident(item.trim()));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|name| !name.is_empty() && name != "super");
    out
}

/// The sources of each module directly under `dir` (a file `x.rs`, or a folder `x/` with everything in it).
fn modules(dir: &Path) -> BTreeMap<String, Vec<(PathBuf, usize)>> {
    let mut found: BTreeMap<String, Vec<(PathBuf, usize)>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut stack = vec![(path.clone(), 1)];
            while let Some((p, depth)) = stack.pop() {
                if p.is_dir() {
                    stack.extend(std::fs::read_dir(&p).unwrap().map(|e| (e.unwrap().path(), depth + 1)));
                } else if p.extension().is_some_and(|e| e == "rs") {
                    // How many `super::` reach `dir` from this file: 1 from `x/mod.rs`, 2 from `x/y.rs`, ...
                    let up = if p.file_name().is_some_and(|f| f == "mod.rs") { depth - 1 } else { depth };
                    found.entry(name.clone()).or_default().push((p, up));
                }
            }
        } else if path.extension().is_some_and(|e| e == "rs") && !["main", "lib", "mod"].contains(&name.as_str()) {
            found.entry(name).or_default().push((path, 1));
        }
    }
    found
}

/// Which sibling modules each module under `dir` names, through `crate_path` (e.g. `crate::`) or `super::`.
fn edges(dir: &Path, crate_path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(dir);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, files) in &mods {
        for (file, up) in files {
            let code: String = std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .map(|l| l.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            let supers = "super::".repeat(*up);
            for target in reached(&code, crate_path).into_iter().chain(reached(&code, &supers)) {
                if &target != name && mods.contains_key(&target) {
                    graph.entry(name.clone()).or_default().insert(target);
                }
            }
        }
    }
    graph
}

/// Every circle in the graph, as the modules on it.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![vec![start.clone()]];
        while let Some(path) = stack.pop() {
            for next in graph.get(path.last().unwrap()).into_iter().flatten() {
                if next == start {
                    let mut circle = path.clone();
                    circle.sort();
                    found.insert(circle);
                } else if !path.contains(next) && next > start {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push(longer);
                }
            }
        }
    }
    found.into_iter().collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn the_graph_reader_sees_plain_grouped_and_nested_paths() {
    let code =
        "use crate::vm_cmd::X;\nuse super::{warm::BootPlan, operation::{Op, Rollback}, now};\nsuper::super::up()";
    assert_eq!(reached(code, "crate::"), ["vm_cmd"]);
    assert_eq!(reached(code, "super::"), ["warm", "operation", "now"]);
    assert_eq!(reached(code, "super::super::"), ["up"]);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(circles(&graph), [vec!["a".to_string(), "b".into(), "c".into()]]);
}

#[test]
fn no_module_of_the_cli_the_agent_or_the_engine_imports_one_that_imports_it() {
    let trees = [
        (root().join("cli/src"), "crate::"),
        (root().join("guest-agent/src"), "crate::"),
        (root().join("server/src/engine"), "crate::engine::"),
    ];
    let mut report = vec![];
    for (dir, crate_path) in trees {
        let graph = edges(&dir, crate_path);
        assert!(graph.len() > 4, "{} has only {graph:?}", dir.display());
        for circle in circles(&graph) {
            report.push(format!("{}: {}", dir.display(), circle.join(" <-> ")));
        }
    }
    assert!(report.is_empty(), "import circles (move what they share to a module of its own):\n{}", report.join("\n"));
}
