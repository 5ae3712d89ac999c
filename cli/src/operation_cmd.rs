//! Following long-running operations: live stages with timings, Ctrl-C to cancel (which rolls back).
use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use tools_schema::operation::{OperationInfo, OperationRef, OperationState, OperationWaitParams, StageState};
use tools_schema::ops;

use crate::client::Daemon;
use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum OperationCmd {
    /// List running and recently finished operations.
    #[command(after_help = "Example:\n  banger operation list --json")]
    List,
    /// Show one operation's stages and outcome.
    #[command(after_help = "Example:\n  banger operation status 3f2a9c1d0b7e4a65")]
    Status { id: String },
    /// Cancel a running operation and wait for its rollback.
    #[command(after_help = "Example:\n  banger operation cancel 3f2a9c1d0b7e4a65")]
    Cancel { id: String },
    /// Wait for an operation's next change (a stage, its detail, its end) and show it then: the daemon
    /// answers at the change, so a script can follow an operation without polling.
    #[command(after_help = "Examples:\n  banger operation wait 3f2a9c1d0b7e4a65 --json\n  \
banger operation wait 3f2a9c1d0b7e4a65 --after 4 --timeout-ms 5000 --json")]
    Wait {
        id: String,
        /// The `revision` already seen: answer once the operation's is higher (0: at once).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Answer after this long even without a change (1-60000 ms; the daemon's default is 30000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60000))]
        timeout_ms: Option<u64>,
    },
}

pub async fn run(cmd: OperationCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    let info = match cmd {
        OperationCmd::List => {
            let list = d.call::<ops::OperationList>(&Default::default()).await?;
            if ctx.json {
                output::json(&list);
            } else {
                let rows = list
                    .operations
                    .iter()
                    .map(|o| {
                        vec![
                            o.id.clone(),
                            o.kind.clone(),
                            o.target.clone(),
                            format!("{:?}", o.state).to_lowercase(),
                            format!("{:.1}s", o.elapsed_ms as f64 / 1000.0),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["ID", "KIND", "TARGET", "STATE", "ELAPSED"], &rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
        OperationCmd::Status { id } => d.call::<ops::OperationStatus>(&OperationRef { id }).await?,
        OperationCmd::Cancel { id } => d.call::<ops::OperationCancel>(&OperationRef { id }).await?,
        OperationCmd::Wait { id, after, timeout_ms } => {
            d.call::<ops::OperationWait>(&OperationWaitParams { id, after, timeout_ms }).await?
        }
    };
    if ctx.json {
        output::json(&info);
    } else {
        print_stages(&info);
        println!("{} {} {}: {:?} (revision {})", info.kind, info.target, info.id, info.state, info.revision);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_stages(info: &OperationInfo) {
    for s in &info.stages {
        let mark = match s.state {
            StageState::Done => "ok",
            StageState::Failed => "FAILED",
            StageState::Running => "...",
            StageState::Pending => "-",
        };
        let ms = s.duration_ms.map(|d| format!("{d:>6} ms")).unwrap_or_default();
        println!("  {:<10} {:<7} {ms}", s.name, mark);
    }
}

/// Follows an operation until it finishes, printing each stage as it completes (when `live`): each
/// `operation.wait` is answered by the daemon at the operation's next change, so nothing polls. Ctrl-C asks
/// the daemon to cancel it and waits for the rollback.
pub async fn follow(d: &Daemon, mut info: OperationInfo, live: bool) -> anyhow::Result<OperationInfo> {
    let mut printed = 0usize;
    let mut cancelling = false;
    let print_done = |info: &OperationInfo, printed: &mut usize| {
        while *printed < info.stages.len() {
            let s = &info.stages[*printed];
            match s.state {
                StageState::Done | StageState::Failed => {
                    if live {
                        let mark = if s.state == StageState::Done { "ok" } else { "FAILED" };
                        eprintln!("  {:<8} {:<6} {:>6} ms", s.name, mark, s.duration_ms.unwrap_or(0));
                    }
                    *printed += 1;
                }
                _ => break,
            }
        }
        let _ = std::io::stderr().flush();
    };
    if live {
        eprintln!("{} {} (Ctrl-C cancels and rolls back)", info.kind, info.target);
    }
    let mut last_detail: Option<String> = None;
    loop {
        print_done(&info, &mut printed);
        // What the running stage is doing (e.g. a recipe's output), each new line once.
        if live && info.detail.is_some() && info.detail != last_detail {
            let running = info.stages.iter().find(|s| s.state == StageState::Running).map(|s| s.name.as_str());
            let detail = crate::output::term_line(info.detail.as_deref().unwrap_or_default());
            eprintln!("    {}: {detail}", running.unwrap_or("-"));
            last_detail = info.detail.clone();
        }
        if info.state != OperationState::Running {
            return Ok(info);
        }
        let next = OperationWaitParams { id: info.id.clone(), after: info.revision, timeout_ms: None };
        tokio::select! {
            changed = d.call::<ops::OperationWait>(&next) => info = changed?,
            _ = tokio::signal::ctrl_c(), if !cancelling => {
                cancelling = true;
                if live {
                    eprintln!("  cancelling...");
                }
                info = d.call::<ops::OperationCancel>(&OperationRef { id: info.id.clone() }).await?;
            }
        }
    }
}
