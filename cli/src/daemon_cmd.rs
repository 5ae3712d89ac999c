//! `banger daemon start|stop|status|ping|unit`.
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Subcommand;
use tools_schema::ops;

use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum DaemonCmd {
    /// Start bangerd in the background (or in the foreground with --foreground) and wait until it answers.
    #[command(after_help = "Examples:\n  banger daemon start\n  banger daemon start --foreground --log-format text")]
    Start {
        /// Run in this terminal instead of detaching.
        #[arg(long)]
        foreground: bool,
        /// Extra arguments for bangerd (e.g. --log-level debug).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Stop the running daemon. VMs keep running; the next daemon adopts them.
    #[command(after_help = "Example:\n  banger daemon stop")]
    Stop,
    /// Show the daemon's build, socket, state directory, VM counts and VMM choice.
    #[command(after_help = "Examples:\n  banger daemon status\n  banger daemon status --json")]
    Status,
    /// Check that the daemon answers.
    #[command(after_help = "Example:\n  banger daemon ping")]
    Ping,
    /// Print a systemd unit file for bangerd.
    #[command(
        after_help = "Example:\n  banger daemon unit > /etc/systemd/system/bangerd.service && systemctl enable --now bangerd"
    )]
    Unit,
}

/// bangerd next to this binary, else on PATH.
fn bangerd_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("bangerd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("bangerd"))
}

pub async fn run(cmd: DaemonCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        DaemonCmd::Start { foreground, args } => {
            if let Ok(d) = ctx.daemon().await {
                if let Ok(p) = d.call::<ops::DaemonPing>(&Default::default()).await {
                    println!("bangerd is already running (pid {}, {})", p.pid, p.build);
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let bin = bangerd_path();
            if foreground {
                let status = std::process::Command::new(&bin).args(&args).status()?;
                return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
            let state_dir = banger_client::paths::Defaults::detect().daemon_state_dir().map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&state_dir)?;
            let out_path = state_dir.join("bangerd.out");
            // The daemon's stderr: as private as its log (0600, never through a link).
            let out = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&out_path)?
            };
            out.set_len(0)?;
            let mut cmd = std::process::Command::new(&bin);
            cmd.args(&args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
            // Its own session: the daemon must not die with this terminal.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    nix::unistd::setsid().map_err(std::io::Error::from)?;
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot run {}: {e}", bin.display()))?;
            let started = Instant::now();
            loop {
                if let Ok(d) = ctx.daemon().await {
                    if let Ok(p) = d.call::<ops::DaemonPing>(&Default::default()).await {
                        if ctx.json {
                            output::json(&p);
                        } else {
                            println!(
                                "bangerd started (pid {}, {}) in {:.1}s",
                                p.pid,
                                p.build,
                                started.elapsed().as_secs_f64()
                            );
                        }
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                if let Some(status) = child.try_wait()? {
                    let log = std::fs::read_to_string(&out_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
                    anyhow::bail!("bangerd exited ({status}) before answering:\n{}\n  hint: `banger daemon start --foreground` shows why", tail.join("\n"));
                }
                if started.elapsed() > Duration::from_secs(20) {
                    anyhow::bail!("bangerd did not answer within 20s; see {}", out_path.display());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        DaemonCmd::Stop => {
            let d = match ctx.daemon().await {
                Ok(d) => d,
                Err(_) => {
                    println!("bangerd is not running");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let p = d.call::<ops::DaemonPing>(&Default::default()).await?;
            drop(d);
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGTERM)?;
            let started = Instant::now();
            while std::path::Path::new(&format!("/proc/{}", p.pid)).exists() {
                if started.elapsed() > Duration::from_secs(20) {
                    anyhow::bail!("bangerd (pid {}) did not stop within 20s", p.pid);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("bangerd stopped (pid {})", p.pid);
        }
        DaemonCmd::Status => {
            let s = ctx.daemon().await?.call::<ops::DaemonStatus>(&Default::default()).await?;
            if ctx.json {
                output::json(&s);
            } else {
                println!("bangerd   {} (pid {}, up {}s)", s.build, s.pid, s.uptime_secs);
                println!("socket    {}", s.socket);
                println!("state     {}", s.state_dir);
                println!("log       {}", s.log_file.as_deref().unwrap_or("-"));
                println!("VMs       {} running, {} total", s.vms_running, s.vms_total);
                println!("images    {}", s.images);
                println!("VMM       {} ({})", s.vmm.vmm.as_str(), s.vmm.reason);
                println!("warm pool {}", warm_pool_line(&s.warm_pool));
                println!("limits    {}", s.limits.summary());
                println!(
                    "console   {}",
                    s.web_url.as_deref().unwrap_or("- (disabled, or its port was taken: see the log)")
                );
            }
        }
        DaemonCmd::Ping => {
            let p = ctx.daemon().await?.call::<ops::DaemonPing>(&Default::default()).await?;
            if ctx.json {
                output::json(&p)
            } else {
                println!("pong from bangerd {} (pid {})", p.build, p.pid)
            }
        }
        DaemonCmd::Unit => {
            let bin = std::path::absolute(bangerd_path())?;
            print!(
                "[Unit]\nDescription=banger daemon: microVM sandboxes for coding agents\nAfter=network.target\n\n\
                 [Service]\nExecStart={}\nRestart=on-failure\n\
                 # VMM processes run in their own sessions but share the unit's cgroup: only the daemon may be\n\
                 # killed on stop/restart, so VMs survive and the next daemon re-adopts them.\nKillMode=process\n\n\
                 [Install]\nWantedBy=multi-user.target\n",
                bin.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line on the warm pool: what is ready per image, or how to turn it on.
fn warm_pool_line(p: &tools_schema::daemon::WarmPoolStatus) -> String {
    if p.size == 0 {
        return "none (no default image yet, or [warm] pool_size = 0 in the config)".into();
    }
    let images: Vec<String> = p
        .images
        .iter()
        .map(|i| {
            let filling = if i.filling > 0 { format!(", {} restoring", i.filling) } else { String::new() };
            format!("{} {}/{} ready{filling}", i.image, i.ready, i.size)
        })
        .collect();
    let per_image = if images.is_empty() { "no image to pool yet".to_string() } else { images.join("; ") };
    format!("{per_image} ({} vCPU, {} MiB VMs)", p.vcpus, p.memory_mib)
}
