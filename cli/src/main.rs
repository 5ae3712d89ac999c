//! banger: the human CLI for the banger daemon, and `banger mcp`, the stdio MCP bridge.
//!
//! Every command maps to one daemon operation (JSON-RPC method `vm.create` is `banger vm create`) and
//! takes `--json` to print the operation's typed result instead of a table.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench_cmd;
mod client;
mod cp;
mod daemon_cmd;
mod mcp_bridge;
mod operation_cmd;
mod output;
mod session_cmd;
mod vm_cmd;

use client::{CallError, Daemon};

#[derive(Parser)]
#[command(name = "banger", version = env!("CARGO_PKG_VERSION"), about = "Local microVM sandboxes for coding agents and the humans who direct them")]
#[command(
    after_help = "Examples:\n  banger vm create --name dev\n  banger vm exec dev -- uname -a\n  banger vm list --json\n  claude mcp add banger -- banger mcp"
)]
pub struct Cli {
    /// The daemon's socket (default: /run/banger/bangerd.sock as root, $XDG_RUNTIME_DIR/banger/bangerd.sock otherwise).
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
    Version,
    /// Manage the banger daemon.
    #[command(subcommand)]
    Daemon(daemon_cmd::DaemonCmd),
    /// Check every host prerequisite and say which VMM this host uses and why.
    #[command(after_help = "Example:\n  banger doctor --json")]
    Doctor,
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(vm_cmd::VmCmd),
    /// Follow or cancel long-running operations (VM creates).
    #[command(subcommand)]
    Operation(operation_cmd::OperationCmd),
    /// Benchmarks that print numbers (never pass/fail on timing).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Serve MCP on stdio, relayed to the daemon (for `claude mcp add banger -- banger mcp`).
    Mcp,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Register an existing kernel, initramfs and ext4 root filesystem as an image.
    #[command(
        after_help = "Example:\n  banger image register --name debian --kernel /path/vmlinuz --initrd /path/initrd --rootfs /path/root.ext4 --default"
    )]
    Register(RegisterArgs),
    /// List images.
    List,
    /// Show one image.
    Show { image: String },
    /// Make an image the default for new VMs.
    Promote { image: String },
    /// Delete an image (refused while VMs use it).
    Delete { image: String },
}

#[derive(Args)]
struct RegisterArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    kernel_elf: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    rootfs: PathBuf,
    /// ext4 with the initial /root (label banger-work); an empty one is made when omitted.
    #[arg(long)]
    work_seed: Option<PathBuf>,
    /// Make it the default image.
    #[arg(long)]
    default: bool,
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

fn absolute(p: PathBuf) -> String {
    std::path::absolute(&p).unwrap_or(p).display().to_string()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(|| banger_server::config::Defaults::detect().socket);
    let ctx = Ctx { socket, json: cli.json };
    match run(cli.command, &ctx).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
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
        Command::Doctor => {
            let report = ctx.daemon().await?.call::<ops::DoctorRun>(&Default::default()).await?;
            if ctx.json {
                output::json(&report);
            } else {
                for c in &report.checks {
                    let mark = match c.status {
                        tools_schema::daemon::CheckStatus::Pass => "pass",
                        tools_schema::daemon::CheckStatus::Warn => "WARN",
                        tools_schema::daemon::CheckStatus::Fail => "FAIL",
                    };
                    println!("[{mark}] {:<20} {}", c.name, c.detail);
                    if let Some(fix) = &c.fix {
                        println!("       {:<20} fix: {fix}", "");
                    }
                }
                println!("\nVMM: {} ({})", report.vmm.vmm.as_str(), report.vmm.reason);
            }
            if !report.ok {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Image(i) => {
            let d = ctx.daemon().await?;
            match i {
                ImageCmd::Register(a) => {
                    let p = tools_schema::image::ImageRegisterParams {
                        name: a.name,
                        kernel: absolute(a.kernel),
                        kernel_elf: a.kernel_elf.map(absolute),
                        initrd: a.initrd.map(absolute),
                        rootfs: absolute(a.rootfs),
                        work_seed: a.work_seed.map(absolute),
                        make_default: a.default,
                    };
                    let img = d.call::<ops::ImageRegister>(&p).await?;
                    if ctx.json {
                        output::json(&img)
                    } else {
                        println!(
                            "registered image {} ({}){}",
                            img.name,
                            img.fingerprint,
                            if img.is_default { ", default" } else { "" }
                        )
                    }
                }
                ImageCmd::List => {
                    let list = d.call::<ops::ImageList>(&Default::default()).await?;
                    if ctx.json {
                        output::json(&list);
                    } else {
                        let rows = list
                            .images
                            .iter()
                            .map(|i| {
                                vec![
                                    format!("{}{}", i.name, if i.is_default { " *" } else { "" }),
                                    i.id.clone(),
                                    format!("{} MiB", i.rootfs_bytes >> 20),
                                    i.fingerprint.clone(),
                                    output::ago(i.created_at),
                                ]
                            })
                            .collect::<Vec<_>>();
                        output::table(&["NAME", "ID", "ROOTFS", "FINGERPRINT", "CREATED"], &rows);
                    }
                }
                ImageCmd::Show { image } => {
                    output::json(&d.call::<ops::ImageShow>(&tools_schema::image::ImageRef { image }).await?)
                }
                ImageCmd::Promote { image } => {
                    let img = d.call::<ops::ImagePromote>(&tools_schema::image::ImageRef { image }).await?;
                    if ctx.json {
                        output::json(&img)
                    } else {
                        println!("{} is now the default image", img.name)
                    }
                }
                ImageCmd::Delete { image } => {
                    let r = d.call::<ops::ImageDelete>(&tools_schema::image::ImageRef { image }).await?;
                    if ctx.json {
                        output::json(&r)
                    } else {
                        println!("deleted image {}", r.name)
                    }
                }
            }
        }
        Command::Vm(v) => return vm_cmd::run(v, ctx).await,
        Command::Operation(o) => return operation_cmd::run(o, ctx).await,
        Command::Bench(b) => return bench_cmd::run(b, ctx).await,
        Command::Mcp => return mcp_bridge::run(&ctx.socket).await,
    }
    Ok(ExitCode::SUCCESS)
}
