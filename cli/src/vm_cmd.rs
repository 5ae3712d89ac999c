//! `banger vm ...`.
use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tools_schema::ops;
use tools_schema::vm;
use tools_schema::vm::{
    ContentEncoding, ExecStream, VmBatchResult, VmCreateParams, VmExecOutputParams, VmExecParams, VmInfo, VmLogsParams,
    VmRef, VmRefs, EXEC_INLINE_MAX,
};

use crate::args::{parse_env, CreateArgs, ShapeArgs};
use crate::client::Daemon;
use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM and wait until it is ready.
    #[command(after_help = "Examples:\n  banger vm create\n  banger vm create --name dev --vcpus 2 --memory 1024")]
    Create(CreateArgs),
    /// List VMs.
    #[command(after_help = "Examples:\n  banger vm list\n  banger vm list --json")]
    List,
    /// Show one VM.
    #[command(after_help = "Example:\n  banger vm show dev --json")]
    Show { vm: String },
    /// Boot stopped VMs.
    #[command(after_help = "Example:\n  banger vm start dev test")]
    Start {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Shut VMs down gracefully (forced after a grace period). Disks are kept.
    #[command(after_help = "Example:\n  banger vm stop dev test")]
    Stop {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Stop, then start VMs.
    #[command(after_help = "Example:\n  banger vm restart dev")]
    Restart {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Force VMs off immediately. Disks are kept.
    #[command(after_help = "Example:\n  banger vm kill dev")]
    Kill {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Change vcpus, memory, disk size or NAT of stopped VMs (applies at the next start).
    #[command(
        after_help = "Examples:\n  banger vm set dev --vcpus 2 --memory 2048\n  banger vm set dev test --disk 20 --nat true"
    )]
    Set(SetArgs),
    /// Show a VM's resource use (host and guest view).
    #[command(after_help = "Example:\n  banger vm stats dev --json")]
    Stats { vm: String },
    /// Open a shell (or run a command) in a VM over SSH as root, with banger's managed key.
    #[command(after_help = "Examples:\n  banger vm ssh dev\n  banger vm ssh dev -- uptime")]
    Ssh {
        vm: String,
        /// Command to run instead of a login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a VM (any size, binary-safe, mode kept). One side is VM:/path.
    #[command(
        after_help = "Examples:\n  banger vm cp ./build.tar dev:/root/build.tar\n  banger vm cp dev:/root/out.log ./out.log"
    )]
    Cp { src: String, dst: String },
    /// List a VM's listening ports: PROTO ENDPOINT PROCESS COMMAND (web services as URLs).
    #[command(after_help = "Example:\n  banger vm ports dev")]
    Ports { vm: String },
    /// Delete VMs and their disks.
    #[command(after_help = "Example:\n  banger vm delete dev test")]
    Delete {
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Run a command in a VM; exits with the command's exit code.
    #[command(
        after_help = "Examples:\n  banger vm exec dev -- uname -a\n  banger vm exec dev --cwd /tmp --env A=1 -- sh -c 'echo $A'"
    )]
    Exec(ExecArgs),
    /// Create a VM from the default image and prepare the current git repository in it.
    #[command(
        after_help = "Examples:\n  banger vm run\n  banger vm run ~/src/app --name app --vcpus 2 --memory 2048 --nat\n\n\
Then start a coding agent in it as a session, attach to it, and bring its work back with `vm workspace export`;\n\
the command prints the exact lines."
    )]
    Run(crate::run_cmd::RunArgs),
    /// Copy a host git repository into a VM, and bring its changes back as a patch.
    #[command(subcommand)]
    Workspace(crate::workspace_cmd::WorkspaceCmd),
    /// Pipe-mode sessions: long-lived guest commands you can send to, attach to and replay.
    #[command(subcommand)]
    Session(crate::session_cmd::SessionCmd),
    /// Show the tail of a VM's console log.
    #[command(after_help = "Example:\n  banger vm logs dev --tail 50")]
    Logs {
        vm: String,
        /// Number of lines.
        #[arg(long, default_value_t = 200)]
        tail: u32,
    },
}

/// Writes a kept command output stream to `to`, in chunks.
async fn copy_exec_output(
    d: &Daemon,
    vm: &str,
    output_id: &str,
    stream: ExecStream,
    to: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let mut offset = 0;
    loop {
        let chunk = d
            .call::<ops::VmExecOutput>(&VmExecOutputParams {
                vm: vm.to_string(),
                output_id: output_id.to_string(),
                stream,
                offset: Some(offset),
                limit: Some(EXEC_INLINE_MAX),
                encoding: Some(ContentEncoding::Base64),
            })
            .await?;
        to.write_all(&base64::engine::general_purpose::STANDARD.decode(&chunk.content)?)?;
        match chunk.next_offset {
            Some(next) => offset = next,
            None => return Ok(()),
        }
    }
}

/// Creates a VM, showing its stages live (Ctrl-C cancels and rolls back); returns it and how long it took.
pub async fn create(d: &Daemon, p: VmCreateParams, ctx: &Ctx) -> anyhow::Result<(VmInfo, u64)> {
    p.validate().map_err(|e| anyhow::anyhow!(e))?;
    let op = d.call::<ops::VmCreateBegin>(&p).await?;
    let done = crate::operation_cmd::follow(d, op, !ctx.json).await?;
    match (done.vm, done.error) {
        (Some(vm), _) => Ok((vm, done.elapsed_ms)),
        (None, Some(e)) => Err(crate::client::CallError::Api(e).into()),
        (None, None) => anyhow::bail!("the create ended without a result"),
    }
}

/// One line on how a VM came up, with why it was not warm when it was not.
/// One line on how a running VM's VMM is contained, as the kernel reports it.
pub fn describe_containment(c: &tools_schema::vm::VmContainment) -> String {
    if !c.contained {
        return format!("no: the VMM runs as uid {} (containment is turned off in the config)", c.uid);
    }
    let mut parts = vec![format!("uid {}", c.uid), if c.seccomp { "seccomp on" } else { "no seccomp" }.to_string()];
    if let Some(m) = c.memory_limit_bytes {
        parts.push(format!("memory {} MiB", m >> 20));
    }
    if let Some(cpu) = c.cpu_limit_percent {
        parts.push(format!("CPU {cpu}%"));
    }
    if let Some(p) = c.pids_limit {
        parts.push(format!("{p} tasks"));
    }
    if let Some(v) = c.cgroup_version {
        parts.push(format!("cgroup v{v}"));
    }
    parts.join(", ")
}

pub fn describe_boot(b: &tools_schema::vm::BootInfo) -> String {
    use tools_schema::vm::BootMode;
    let secs = b.ms as f64 / 1000.0;
    match b.mode {
        BootMode::Warm => format!("restored from the image's warm-start template in {secs:.2}s"),
        BootMode::Pool => format!("taken from the warm pool in {secs:.2}s"),
        BootMode::Cold => match &b.cold_reason {
            Some(why) => format!("cold boot in {secs:.2}s ({why})"),
            None => format!("cold boot in {secs:.2}s"),
        },
    }
}

#[derive(Args)]
pub struct SetArgs {
    #[arg(required = true)]
    vms: Vec<String>,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Root disk size in GiB (grow only, 1-1024).
    #[arg(long = "disk", value_parser = clap::value_parser!(u32).range(vm::MIN_DISK_GIB as i64..=vm::MAX_DISK_GIB as i64))]
    disk_gib: Option<u32>,
    /// Work disk (/root) size in GiB (grow only, 1-1024).
    #[arg(long = "work-disk", value_parser = clap::value_parser!(u32).range(vm::MIN_DISK_GIB as i64..=vm::MAX_DISK_GIB as i64))]
    work_disk_gib: Option<u32>,
    /// NAT to other networks: true or false.
    #[arg(long)]
    nat: Option<bool>,
    /// CPU limit in percent of one host CPU (10-3250, 0 for the shape's default); a running VM takes it at once.
    #[arg(long = "cpu-percent")]
    cpu_percent: Option<u32>,
}

#[derive(Args)]
pub struct ExecArgs {
    vm: String,
    /// Working directory in the guest (default /root).
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Kill the command after this many seconds (default 600).
    #[arg(long)]
    timeout: Option<u64>,
    /// Send this text as the command's standard input.
    #[arg(long)]
    stdin: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn vm_rows(vms: &[VmInfo]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.state.as_str().to_string(),
                v.image.clone(),
                v.vcpus.to_string(),
                format!("{} MiB", v.memory_mib),
                v.vmm.as_str().to_string(),
                v.id.clone(),
                output::ago(v.created_at),
            ]
        })
        .collect()
}

const VM_HEADER: &[&str] = &["NAME", "STATE", "IMAGE", "VCPUS", "MEMORY", "VMM", "ID", "CREATED"];

fn print_batch(verb: &str, r: &VmBatchResult, json: bool) -> ExitCode {
    if json {
        output::json(r);
    } else {
        for o in &r.results {
            match (&o.info, &o.error) {
                (_, Some(e)) => eprintln!(
                    "{}: {}",
                    o.vm,
                    output::term_lines(&e.display_with(&crate::client::next_step::command_line))
                ),
                (Some(i), None) => println!("{}: {verb} ({})", o.vm, i.state.as_str()),
                (None, None) => println!("{}: {verb}", o.vm),
            }
        }
    }
    if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub async fn run(cmd: VmCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        VmCmd::Create(a) => {
            let (vm, elapsed_ms) = create(&d, a.params(), ctx).await?;
            if ctx.json {
                output::json(&vm);
            } else {
                println!("{} is {} ({:.1}s)", vm.name, vm.state.as_str(), elapsed_ms as f64 / 1000.0);
                if let Some(ip) = &vm.ip {
                    println!("  address:        {ip} ({})", vm.dns_name);
                }
                if let Some(boot) = &vm.boot {
                    println!("  started:        {}", describe_boot(boot));
                }
                println!("  run a command:  banger vm exec {} -- uname -a", vm.name);
                println!("  delete it:      banger vm delete {}", vm.name);
            }
        }
        VmCmd::Run(a) => return crate::run_cmd::run(a, &d, ctx).await,
        VmCmd::List => {
            let list = d.call::<ops::VmList>(&Default::default()).await?;
            if ctx.json {
                output::json(&list)
            } else {
                output::table(VM_HEADER, &vm_rows(&list.vms))
            }
        }
        VmCmd::Show { vm } => {
            let info = d.call::<ops::VmShow>(&VmRef { vm }).await?;
            if ctx.json {
                output::json(&info)
            } else {
                output::table(VM_HEADER, &vm_rows(std::slice::from_ref(&info)));
                if let Some(c) = &info.containment {
                    println!("  contained:      {}", describe_containment(c));
                }
            }
        }
        VmCmd::Start { vms } => {
            return Ok(print_batch("started", &d.call::<ops::VmStart>(&VmRefs { vm: vms.into() }).await?, ctx.json))
        }
        VmCmd::Stop { vms } => {
            return Ok(print_batch("stopped", &d.call::<ops::VmStop>(&VmRefs { vm: vms.into() }).await?, ctx.json))
        }
        VmCmd::Restart { vms } => {
            return Ok(print_batch("restarted", &d.call::<ops::VmRestart>(&VmRefs { vm: vms.into() }).await?, ctx.json))
        }
        VmCmd::Kill { vms } => {
            return Ok(print_batch("killed", &d.call::<ops::VmKill>(&VmRefs { vm: vms.into() }).await?, ctx.json))
        }
        VmCmd::Set(a) => {
            let p = tools_schema::vm::VmSetParams {
                vm: a.vms.into(),
                vcpus: a.shape.vcpus,
                memory_mib: a.shape.memory_mib,
                disk_gib: a.disk_gib,
                work_disk_gib: a.work_disk_gib,
                nat: a.nat,
                cpu_percent: a.cpu_percent,
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            return Ok(print_batch("updated", &d.call::<ops::VmSet>(&p).await?, ctx.json));
        }
        VmCmd::Ssh { vm, command } => {
            // The daemon waits for the guest's sshd and its pinned host key, and says how to connect: its
            // options check the host key against what the agent reported over the guest channel, so whoever
            // else answers at this address fails host-key verification.
            let ssh = d.call::<ops::VmSsh>(&VmRef { vm: vm.clone() }).await?;
            let status = std::process::Command::new("ssh")
                .args(ssh.options.iter().flat_map(|o| ["-o", o.as_str()]))
                .arg(&ssh.host)
                // ssh hands the remote shell one string; quote each word so it arrives as given.
                .args(command.iter().map(|w| crate::client::next_step::shell_quote(w)))
                .status()
                .map_err(|e| anyhow::anyhow!("cannot run ssh ({e})\n  hint: apt-get install openssh-client"))?;
            if let Ok(after) = d.call::<ops::VmShow>(&VmRef { vm: vm.clone() }).await {
                if after.state == tools_schema::vm::VmState::Running {
                    eprintln!("banger: {} is still running (`banger vm stop {}` stops it)", after.name, after.name);
                }
            }
            return Ok(ExitCode::from(status.code().unwrap_or(255).clamp(0, 255) as u8));
        }
        VmCmd::Cp { src, dst } => {
            let report = crate::cp::copy(&d, &src, &dst).await?;
            if ctx.json {
                output::json(&report);
            } else {
                println!("copied {} bytes to {} (sha256 {})", report.bytes, report.to, report.sha256);
            }
        }
        VmCmd::Ports { vm } => {
            let p = d.call::<ops::VmPorts>(&VmRef { vm }).await?;
            if ctx.json {
                output::json(&p);
            } else {
                let rows = p
                    .ports
                    .iter()
                    .map(|x| {
                        vec![
                            serde_json::to_value(x.proto)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            x.endpoint.clone(),
                            x.process.clone().unwrap_or_else(|| "-".into()),
                            x.command.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["PROTO", "ENDPOINT", "PROCESS", "COMMAND"], &rows);
            }
        }
        VmCmd::Stats { vm } => {
            let s = d.call::<ops::VmStats>(&VmRef { vm }).await?;
            if ctx.json {
                output::json(&s);
            } else {
                let mib = |b: u64| format!("{} MiB", b >> 20);
                println!("{} ({})", s.name, s.state.as_str());
                if let (Some(cpu), Some(rss)) = (s.host_cpu_seconds, s.host_rss_bytes) {
                    println!("  host:  VMM cpu {cpu:.1}s, rss {}", mib(rss));
                }
                if let (Some(size), Some(used)) = (s.disk_bytes, s.disk_host_bytes) {
                    println!("  disk:  {} virtual, {} used on the host", mib(size), mib(used));
                }
                if let Some(g) = &s.guest {
                    println!(
                        "  guest: up {:.0}s, load {:.2}, mem {} of {} free, root {} of {} used, {} processes",
                        g.uptime_secs,
                        g.load1,
                        mib(g.mem_available_bytes),
                        mib(g.mem_total_bytes),
                        mib(g.root_used_bytes),
                        mib(g.root_total_bytes),
                        g.processes
                    );
                }
            }
        }
        VmCmd::Delete { vms } => {
            return Ok(print_batch("deleted", &d.call::<ops::VmDelete>(&VmRefs { vm: vms.into() }).await?, ctx.json))
        }
        VmCmd::Exec(a) => {
            let p = VmExecParams {
                vm: a.vm,
                command: a.command,
                env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
                cwd: a.cwd,
                stdin: a.stdin,
                timeout_secs: a.timeout,
                max_inline_bytes: None,
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            let vm = p.vm.clone();
            let r = d.call::<ops::VmExec>(&p).await?;
            if ctx.json {
                output::json(&r);
            } else {
                use std::io::Write;
                // A cut stream is fetched whole, byte for byte, from what the daemon kept.
                match (&r.output_id, r.stdout_truncated) {
                    (Some(id), true) => {
                        copy_exec_output(&d, &vm, id, ExecStream::Stdout, &mut std::io::stdout()).await?
                    }
                    _ => std::io::stdout().write_all(r.stdout.as_bytes())?,
                }
                match (&r.output_id, r.stderr_truncated) {
                    (Some(id), true) => {
                        copy_exec_output(&d, &vm, id, ExecStream::Stderr, &mut std::io::stderr()).await?
                    }
                    _ => std::io::stderr().write_all(r.stderr.as_bytes())?,
                }
                if r.output_id.is_none() && (r.stdout_truncated || r.stderr_truncated) {
                    eprintln!(
                        "banger: the output ({} bytes stdout, {} bytes stderr) was cut and could not be kept; \
                         see the daemon log",
                        r.stdout_bytes, r.stderr_bytes
                    );
                }
                if r.timed_out {
                    eprintln!("banger: command timed out and was killed");
                }
            }
            // Like a shell: the command's code, 128+signal when killed, 124 on timeout.
            let code = if r.timed_out { 124 } else { r.exit_code.unwrap_or(128 + r.signal.unwrap_or(0)) };
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        VmCmd::Workspace(w) => return crate::workspace_cmd::run(w, &d, ctx).await,
        VmCmd::Session(s) => return crate::session_cmd::run(s, ctx, &d).await,
        VmCmd::Logs { vm, tail } => {
            let logs = d.call::<ops::VmLogs>(&VmLogsParams { vm, tail: Some(tail) }).await?;
            if ctx.json {
                output::json(&logs);
            } else {
                // Console lines are whatever the guest wrote to its console.
                for l in &logs.lines {
                    println!("{}", output::term_line(l));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
