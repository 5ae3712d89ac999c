//! MCP toolsets: which tools an agent's client lists. Every tool's name, description and schema go into the
//! model's context, so the default (`sandbox`) holds only what the agent's job needs; the rest is opt-in
//! (`banger mcp --toolsets images,admin`, or `all`). A tool outside the listed sets can still be called by
//! name (an error's hint may name one); it is only not advertised.
use serde::{Deserialize, Serialize};

use crate::ops::{OperationSpec, OPERATIONS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Toolset {
    /// Sandboxes and the work in them: create/run/list/delete, exec, files, ports, workspace, sessions.
    Sandbox,
    /// The rest of a VM's life: show, start, stop, restart, kill, set, stats, logs, ssh, and session admin.
    Vms,
    /// Images: list, show, register, build, warm, promote, delete.
    Images,
    /// The daemon and long operations: ping, status, doctor, operation_*, and the `*_begin` forms.
    Admin,
}

/// What an agent gets when it names no toolset.
pub const DEFAULT_TOOLSETS: &[Toolset] = &[Toolset::Sandbox];

/// Each toolset's operations (JSON-RPC method names). Every operation is in exactly one
/// (`every_operation_is_in_exactly_one_toolset`).
pub const TOOLSETS: &[(Toolset, &[&str])] = &[
    (
        Toolset::Sandbox,
        &[
            "vm.create",
            "vm.run",
            "vm.list",
            "vm.delete",
            "vm.exec",
            "vm.exec_output",
            "vm.file_read",
            "vm.file_write",
            "vm.ports",
            "workspace.prepare",
            "workspace.export",
            "session.start",
            "session.send",
            "session.logs",
            "session.stop",
        ],
    ),
    (
        Toolset::Vms,
        &[
            "vm.show",
            "vm.start",
            "vm.stop",
            "vm.restart",
            "vm.kill",
            "vm.set",
            "vm.stats",
            "vm.logs",
            "vm.ssh",
            "session.list",
            "session.show",
            "session.kill",
        ],
    ),
    (
        Toolset::Images,
        &["image.list", "image.show", "image.register", "image.build", "image.warm", "image.promote", "image.delete"],
    ),
    (
        Toolset::Admin,
        &[
            "daemon.ping",
            "daemon.status",
            "doctor.run",
            "operation.status",
            "operation.wait",
            "operation.cancel",
            "operation.list",
            "vm.create_begin",
            "vm.run_begin",
            "image.build_begin",
        ],
    ),
];

impl Toolset {
    pub const ALL: [Toolset; 4] = [Toolset::Sandbox, Toolset::Vms, Toolset::Images, Toolset::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Toolset::Sandbox => "sandbox",
            Toolset::Vms => "vms",
            Toolset::Images => "images",
            Toolset::Admin => "admin",
        }
    }

    /// The toolset of an operation.
    pub fn of(op: &OperationSpec) -> Toolset {
        TOOLSETS
            .iter()
            .find(|(_, methods)| methods.contains(&op.method))
            .map(|(set, _)| *set)
            // Unreachable while the test below holds; an unlisted operation is the least visible kind.
            .unwrap_or(Toolset::Admin)
    }

    /// Reads `sandbox,images`, or `all`; the default set is always included.
    pub fn parse_list(text: &str) -> Result<Vec<Toolset>, String> {
        let mut sets: Vec<Toolset> = DEFAULT_TOOLSETS.to_vec();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word == "all" {
                return Ok(Toolset::ALL.to_vec());
            }
            let set = Toolset::ALL.into_iter().find(|s| s.name() == word).ok_or_else(|| {
                let names: Vec<&str> = Toolset::ALL.iter().map(|s| s.name()).collect();
                format!("unknown toolset `{word}`: the toolsets are {}, or all", names.join(", "))
            })?;
            if !sets.contains(&set) {
                sets.push(set);
            }
        }
        sets.sort();
        Ok(sets)
    }

    /// The operations a client with these toolsets is shown, in `OPERATIONS` order.
    pub fn listed(sets: &[Toolset]) -> impl Iterator<Item = &'static OperationSpec> + '_ {
        OPERATIONS.iter().filter(move |op| sets.contains(&Toolset::of(op)))
    }
}

/// The first line `banger mcp` sends on the daemon's socket, before the client's own MCP messages: which
/// toolsets this client wants listed. A connection that starts with an MCP message gets the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpSessionOptions {
    pub toolsets: Vec<Toolset>,
}

/// The key of the options line: `{"banger_mcp_options": {...}}`.
pub const MCP_OPTIONS_KEY: &str = "banger_mcp_options";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_in_exactly_one_toolset() {
        for op in OPERATIONS {
            let homes: Vec<Toolset> =
                TOOLSETS.iter().filter(|(_, methods)| methods.contains(&op.method)).map(|(s, _)| *s).collect();
            assert_eq!(homes.len(), 1, "{} is in {homes:?}", op.method);
        }
        for (set, methods) in TOOLSETS {
            for m in *methods {
                assert!(OperationSpec::by_method(m).is_some(), "{set:?} names `{m}`, which is no operation");
            }
        }
        assert!(Toolset::listed(DEFAULT_TOOLSETS).count() <= 15, "the default toolset is for an agent's context");
    }

    #[test]
    fn toolset_lists_parse_by_name_or_all_and_always_keep_the_default() {
        assert_eq!(Toolset::parse_list("").unwrap(), [Toolset::Sandbox]);
        assert_eq!(Toolset::parse_list("admin, images").unwrap(), [Toolset::Sandbox, Toolset::Images, Toolset::Admin]);
        assert_eq!(Toolset::parse_list("vms,all").unwrap(), Toolset::ALL);
        let e = Toolset::parse_list("imgs").unwrap_err();
        assert!(e.contains("`imgs`") && e.contains("sandbox, vms, images, admin"), "{e}");
        assert_eq!(Toolset::listed(&Toolset::ALL).count(), OPERATIONS.len());
    }

    /// What the default toolset costs an agent's context (name, description and input schema of each tool, as
    /// `tools/list` sends them): at most 12 KiB. Printed per tool, so a change that breaks it shows where.
    /// (`front_doors::the_default_toolset_fits_an_agents_context_and_all_lists_every_operation` measures the
    /// same over a real `banger mcp`.) `SHOW_SCHEMA=vm_run cargo test -p tools-schema --lib
    /// the_default_toolset_costs -- --nocapture` also prints that tool's input schema.
    #[test]
    fn the_default_toolset_costs_at_most_12_kib_of_context() {
        use crate::portable::{portable, Direction};
        let mut total = 0;
        for op in Toolset::listed(DEFAULT_TOOLSETS) {
            let schema = serde_json::to_string(&portable((op.params_schema)(), Direction::Input)).unwrap();
            let bytes = op.tool_name().len() + op.description.len() + schema.len();
            println!(
                "{:<18} {bytes:>5} bytes (description {}, input schema {})",
                op.tool_name(),
                op.description.len(),
                schema.len()
            );
            if std::env::var("SHOW_SCHEMA").is_ok_and(|t| t == op.tool_name()) {
                println!("{schema}");
            }
            total += bytes;
        }
        println!("default toolset: {total} bytes");
        assert!(total <= 12 << 10, "the default toolset costs {total} bytes of an agent's context");
    }

    /// Every parameter of every tool says what it is (a nested object's own fields may rely on it, as vm_run's
    /// `create` relies on vm_create).
    #[test]
    fn every_parameter_of_every_tool_is_described() {
        use crate::portable::{portable, Direction};
        let mut undescribed = vec![];
        for op in OPERATIONS {
            let schema = portable((op.params_schema)(), Direction::Input);
            let properties = schema.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
            for (name, property) in properties {
                if property.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
                    undescribed.push(format!("{}.{name}", op.tool_name()));
                }
            }
        }
        assert!(undescribed.is_empty(), "parameters without a description: {undescribed:?}");
    }
}
