//! `banger vm run`: the agent workflow's first step in one command. The daemon's `vm.run` operation creates
//! a VM, waits for its sshd, and prepares the current git repository in it; this follows it (Ctrl-C cancels
//! at any stage, and the daemon deletes the VM it made) and prints what to do next.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tools_schema::ops;
use tools_schema::workspace::VmRunParams;

use crate::args::CreateArgs;
use crate::client::{CallError, Daemon};
use crate::{output, Ctx};

#[derive(Args)]
pub struct RunArgs {
    /// The host git repository to work on (default: the current directory).
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Also copy untracked (not ignored) files and submodule contents.
    #[arg(long)]
    full: bool,
    #[command(flatten)]
    create: CreateArgs,
}

pub async fn run(a: RunArgs, d: &Daemon, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    // Refuse a path that is not a repository before asking for anything (the daemon checks again).
    let repo = std::fs::canonicalize(&a.path).map_err(|e| anyhow::anyhow!("cannot use {}: {e}", a.path.display()))?;
    let top = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(&repo)
        .args(["rev-parse", "--show-toplevel"])
        .output()?;
    if !top.status.success() {
        anyhow::bail!(
            "{} is not inside a git repository\n  hint: run `banger vm run` in a repository, or give its path",
            repo.display()
        );
    }
    // The identity the user running the CLI would commit as, like `vm workspace prepare`.
    let prepare = crate::workspace_cmd::prepare_params(String::new(), &repo, a.full, false)?;
    let p = VmRunParams {
        path: prepare.path,
        mode: prepare.mode,
        create: a.create.params(),
        git_user_name: prepare.git_user_name,
        git_user_email: prepare.git_user_email,
    };
    p.validate().map_err(|e| anyhow::anyhow!(e))?;
    let op = d.call::<ops::VmRunBegin>(&p).await?;
    let done = crate::operation_cmd::follow(d, op, !ctx.json).await?;
    let (vm, r) = match (done.vm, done.workspace, done.error) {
        (Some(vm), Some(r), _) => (vm, r),
        (_, _, Some(e)) => return Err(CallError::Api(e).into()),
        _ => anyhow::bail!("the run ended without a result"),
    };
    if ctx.json {
        output::json(&tools_schema::workspace::VmRunResult { vm, workspace: r });
        return Ok(ExitCode::SUCCESS);
    }
    let name = &vm.name;
    println!(
        "{name} is running with {} at {} (head {}, {} files)",
        r.source,
        r.path,
        &r.head_commit[..12.min(r.head_commit.len())],
        r.files
    );
    println!();
    println!("Next:");
    println!("  banger vm session start {name} --name agent --cwd /root/repo -- claude   start a coding agent (or opencode, pi)");
    println!("  banger vm session attach agent                                          talk to it; detaching leaves it running");
    println!("  banger vm exec {name} --cwd /root/repo -- git status                        look around");
    println!("  banger vm workspace export {name} | git apply                               bring its work back here");
    println!("  banger vm delete {name}                                                     when done");
    Ok(ExitCode::SUCCESS)
}
