//! banger: the human CLI for the banger daemon, and `banger mcp`, the stdio MCP bridge.
//!
//! Every command maps to one daemon operation (JSON-RPC method `vm.create` is `banger vm create`) and
//! takes `--json` to print the operation's typed result instead of a table.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod bench_cmd;
/// The client crate's JSON-RPC client, under the name the commands use.
mod client {
    pub use banger_client::next_step;
    pub use banger_client::rpc::*;
}
mod cp;
mod daemon_cmd;
mod host_file;
mod image_cmd;
mod mcp_bridge;
mod operation_cmd;
mod output;
mod run_cmd;
mod session_cmd;
mod vm_cmd;
mod workspace_cmd;

use client::{CallError, Daemon};

#[derive(Parser)]
#[command(name = "banger", version = env!("CARGO_PKG_VERSION"), about = "Local microVM sandboxes for coding agents and the humans who direct them")]
#[command(
    after_help = "Examples:\n  banger vm create --name dev\n  banger vm exec dev -- uname -a\n  banger vm list --json\n  claude mcp add banger -- banger mcp"
)]
pub struct Cli {
    /// The daemon's socket (default: the system daemon's /run/banger/bangerd.sock when it exists, else this
    /// user's own daemon's, $XDG_RUNTIME_DIR/banger/bangerd.sock).
    #[arg(long, global = true, env = "BANGER_SOCKET")]
    socket: Option<PathBuf>,
    /// Print the result as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the build of this CLI and of the running daemon.
    #[command(after_help = "Examples:\n  banger version\n  banger version --json")]
    Version,
    /// Manage the banger daemon.
    #[command(subcommand)]
    Daemon(daemon_cmd::DaemonCmd),
    /// Check every host prerequisite and say which VMM this host uses and why.
    #[command(after_help = "Examples:\n  banger doctor\n  banger doctor --boot --json")]
    Doctor {
        /// Also boot a throwaway guest on each VMM this host can run, run a command in it and delete it.
        #[arg(long)]
        boot: bool,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(vm_cmd::VmCmd),
    /// Follow or cancel long-running operations (VM creates, image builds, workspace prepare/export).
    #[command(subcommand)]
    Operation(operation_cmd::OperationCmd),
    /// Measure cold and warm creates against the bare VMM, exec and channel round trips, idle memory and
    /// workspace throughput, all in one run on this host. Prints numbers; never passes or fails on them.
    Bench(bench_cmd::BenchArgs),
    /// Serve MCP on stdio, relayed to the daemon (for `claude mcp add banger -- banger mcp`).
    #[command(after_help = "Examples:\n  claude mcp add --scope user banger -- banger mcp\n  \
npx @modelcontextprotocol/inspector --cli banger mcp --method tools/list\n  \
claude mcp add banger -- banger mcp --toolsets images,vms\n\nSee docs/AGENTS.md for opencode and pi.")]
    Mcp {
        /// Toolsets the client lists besides `sandbox` (sandboxes, exec, files, workspace, sessions): any of
        /// vms, images, admin, or all. Every tool can be called by name either way.
        #[arg(long, env = "BANGER_MCP_TOOLSETS", value_parser = check_toolsets, default_value = "")]
        toolsets: String,
    },
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  banger completions bash > /etc/bash_completion.d/banger\n  \
banger completions zsh > \"${fpath[1]}/_banger\"\n  banger completions fish > ~/.config/fish/completions/banger.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

pub struct Ctx {
    pub socket: PathBuf,
    pub json: bool,
}

impl Ctx {
    pub async fn daemon(&self) -> Result<Daemon, CallError> {
        Daemon::connect(&self.socket).await
    }
}

pub(crate) fn absolute(p: PathBuf) -> String {
    std::path::absolute(&p).unwrap_or(p).display().to_string()
}

#[tokio::main]
async fn main() -> ExitCode {
    // Like any Unix filter: `banger vm list | head` ends quietly when the reader goes away, instead of
    // panicking on a broken pipe (Rust ignores SIGPIPE by default).
    // SAFETY: SIG_DFL installs no handler, so no code of ours runs in signal context.
    let _ =
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(banger_client::paths::Defaults::client_socket);
    let ctx = Ctx { socket, json: cli.json };
    match run(cli.command, &ctx).await {
        Ok(code) => code,
        Err(e) => {
            // Errors can quote a guest (its stderr, its paths): made safe like any guest string.
            // Errors can quote a guest: each line is escaped, and the lines (message, hint) stay lines.
            eprintln!("error: {}", output::term_lines(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

fn check_mark(status: tools_schema::daemon::CheckStatus) -> &'static str {
    match status {
        tools_schema::daemon::CheckStatus::Pass => "pass",
        tools_schema::daemon::CheckStatus::Warn => "WARN",
        tools_schema::daemon::CheckStatus::Fail => "FAIL",
    }
}

async fn run(cmd: Command, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    use tools_schema::ops;
    match cmd {
        Command::Version => {
            let cli_build = tools_schema::BuildInfo::current();
            let daemon = match ctx.daemon().await {
                Ok(d) => d.call::<ops::DaemonPing>(&Default::default()).await.ok().map(|p| p.build),
                Err(_) => None,
            };
            if ctx.json {
                output::json(&serde_json::json!({"cli": cli_build, "daemon": daemon}));
            } else {
                println!("banger  {cli_build}");
                match daemon {
                    Some(d) => println!(
                        "bangerd {d}{}",
                        if d == cli_build { "" } else { "  (differs from the CLI: restart the daemon)" }
                    ),
                    None => println!("bangerd not running"),
                }
            }
        }
        Command::Daemon(d) => return daemon_cmd::run(d, ctx).await,
        Command::Doctor { boot } => {
            if boot && !ctx.json {
                eprintln!("booting a throwaway guest on each VMM this host can run...");
            }
            let params = tools_schema::daemon::DoctorParams { boot };
            let report = ctx.daemon().await?.call::<ops::DoctorRun>(&params).await?;
            if ctx.json {
                output::json(&report);
            } else {
                for c in &report.checks {
                    println!("[{}] {:<20} {}", check_mark(c.status), c.name, c.detail);
                    if let Some(fix) = &c.fix {
                        println!("       {:<20} fix: {fix}", "");
                    }
                }
                for b in &report.boots {
                    let name = format!("boot {}", b.vmm.as_str());
                    // The detail and logs quote the guest's console: escaped before they reach the terminal.
                    println!("[{}] {name:<20} {}", check_mark(b.status), output::term_safe(&b.detail));
                    if let Some(logs) = &b.logs {
                        for line in logs.lines() {
                            println!("       {:<20} | {}", "", output::term_line(line));
                        }
                    }
                }
                println!("\nVMM: {} ({})", report.vmm.vmm.as_str(), report.vmm.reason);
            }
            if !report.ok {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Image(i) => return image_cmd::run(i, ctx).await,
        Command::Vm(v) => return vm_cmd::run(v, ctx).await,
        Command::Operation(o) => return operation_cmd::run(o, ctx).await,
        Command::Bench(b) => return bench_cmd::run(b, ctx).await,
        Command::Mcp { toolsets } => {
            let toolsets = tools_schema::toolsets::Toolset::parse_list(&toolsets).map_err(|e| anyhow::anyhow!(e))?;
            return mcp_bridge::run(&ctx.socket, toolsets).await;
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "banger", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--toolsets`: a comma-separated list, or `all` (`Toolset::parse_list`), refused by clap when bad.
fn check_toolsets(text: &str) -> Result<String, String> {
    tools_schema::toolsets::Toolset::parse_list(text).map(|_| text.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Operations whose CLI command does not follow the naming rule (`group.verb` is `banger group verb`,
    /// `x_begin` is `x`'s command, sessions and workspaces are under `banger vm`).
    const IRREGULAR: &[(&str, &[&str])] = &[
        ("doctor.run", &["doctor"]),
        // `vm exec` fetches a cut output itself; `vm cp` reads and writes files.
        ("vm.exec_output", &["vm", "exec"]),
        ("vm.file_read", &["vm", "cp"]),
        ("vm.file_write", &["vm", "cp"]),
    ];

    fn command_for(method: &str) -> Vec<String> {
        if let Some((_, path)) = IRREGULAR.iter().find(|(m, _)| *m == method) {
            return path.iter().map(|s| s.to_string()).collect();
        }
        let (group, verb) = method.split_once('.').expect("methods are group.verb");
        let verb = verb.strip_suffix("_begin").unwrap_or(verb).replace('_', "-");
        match group {
            "session" | "workspace" => vec!["vm".into(), group.into(), verb],
            _ => vec![group.into(), verb],
        }
    }

    #[test]
    fn every_daemon_operation_has_a_cli_command() {
        let cli = super::Cli::command();
        let mut missing = vec![];
        for op in tools_schema::ops::OPERATIONS {
            let path = command_for(op.method);
            let mut cmd = &cli;
            for word in &path {
                match cmd.find_subcommand(word) {
                    Some(sub) => cmd = sub,
                    None => {
                        missing.push(format!("{} (banger {})", op.method, path.join(" ")));
                        break;
                    }
                }
            }
        }
        assert!(missing.is_empty(), "operations without a CLI command: {missing:?}");
        for (method, _) in IRREGULAR {
            assert!(
                tools_schema::ops::OperationSpec::by_method(method).is_some(),
                "IRREGULAR names no operation {method}"
            );
        }
    }

    /// Every next step an error can carry reads as a command line this CLI accepts: each is rendered
    /// (`banger_client::next_step`), split as a shell would, and parsed by the CLI's own parser.
    #[test]
    fn every_next_step_renders_as_a_command_the_cli_parses() {
        use serde_json::json;
        let steps = [
            ("vm.list", json!({})),
            ("vm.show", json!({"vm": "dev"})),
            ("vm.logs", json!({"vm": "dev"})),
            ("vm.ssh", json!({"vm": "dev"})),
            ("vm.ports", json!({"vm": "dev"})),
            ("vm.stats", json!({"vm": "dev"})),
            ("vm.start", json!({"vm": ["a", "b"]})),
            ("vm.stop", json!({"vm": "dev"})),
            ("vm.restart", json!({"vm": "dev"})),
            ("vm.kill", json!({"vm": "dev"})),
            ("vm.delete", json!({"vm": ["a", "b"]})),
            ("vm.exec", json!({"vm": "dev", "cwd": "/root", "command": ["ls", "-la", "<folder>"]})),
            ("vm.create", json!({"name": "dev", "image": "agent", "vcpus": 2, "memory_mib": 128})),
            ("vm.run", json!({"path": "/src/app", "create": {"memory_mib": 512}})),
            ("session.list", json!({"vm": "dev"})),
            ("session.logs", json!({"session": "s", "vm": "dev"})),
            ("session.show", json!({"session": "s", "vm": "dev"})),
            ("session.stop", json!({"session": "s"})),
            ("session.kill", json!({"session": "s", "vm": "dev"})),
            ("session.start", json!({"vm": "dev", "cwd": "/root/repo", "command": ["sh", "-c", "echo 'hi'"]})),
            ("workspace.prepare", json!({"vm": "dev", "path": "/src/my app", "force": true, "mode": "full"})),
            ("workspace.export", json!({"vm": "dev", "check_repo": "/src/app", "delete": true})),
            ("image.list", json!({})),
            ("image.show", json!({"image": "agent"})),
            ("image.delete", json!({"image": "agent"})),
            ("image.promote", json!({"image": "agent"})),
            ("image.warm", json!({"image": "agent", "vcpus": 2, "memory_mib": 1024, "rebuild": true})),
            (
                "image.register",
                json!({"name": "x", "kernel": "/k", "initrd": "/i", "rootfs": "/r.ext4", "make_default": true}),
            ),
            ("doctor.run", json!({})),
            ("daemon.status", json!({})),
            ("operation.list", json!({})),
        ];
        for (method, args) in steps {
            let step = tools_schema::error::NextStep::new(method, args, "why");
            let line = banger_client::next_step::command_line(&step);
            let words = shlex::split(&line).unwrap_or_else(|| panic!("{method}: `{line}` does not split"));
            assert_eq!(words[0], "banger", "{method} has no command: {line}");
            if let Err(e) = <super::Cli as clap::Parser>::try_parse_from(&words) {
                panic!("{method}: `{line}` is not a command the CLI takes: {e}");
            }
        }
    }
}
