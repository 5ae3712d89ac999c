//! `banger vm run`: the agent workflow's first step in one command. Creates a VM, prepares the current git
//! repository in it, and prints what to do next. If the prepare fails, the VM it just made is deleted, so a
//! failed run leaves nothing behind.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tools_schema::ops;
use tools_schema::vm::{VmRef, VmRefs};

use crate::client::Daemon;
use crate::vm_cmd::CreateArgs;
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
    // Refuse a path that is not a repository before making anything.
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
    let mut create = a.create.params();
    if create.name.is_none() {
        create.name = free_name_like(d, &repo).await;
    }
    let (vm, _) = crate::vm_cmd::create(d, create, ctx).await?;
    let prepared = async {
        let p = crate::workspace_cmd::prepare_params(vm.name.clone(), &repo, a.full, false)?;
        anyhow::Ok(d.call::<ops::WorkspacePrepare>(&p).await?)
    };
    let r = match prepared.await {
        Ok(r) => r,
        Err(e) => {
            // Nothing half-done stays behind: the VM was made for this repository only.
            let _ = d.call::<ops::VmDelete>(&VmRefs { vms: vec![vm.name.clone()] }).await;
            return Err(anyhow::anyhow!("{e:#}\n  (the VM {} made for it was deleted)", vm.name));
        }
    };
    if ctx.json {
        output::json(&serde_json::json!({"vm": vm, "workspace": r}));
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

/// The repository's folder name as a VM name, when it is valid and not taken; otherwise the daemon picks one.
async fn free_name_like(d: &Daemon, repo: &std::path::Path) -> Option<String> {
    let base = repo.file_name()?.to_string_lossy().to_lowercase();
    let mut name: String = base.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    name = name.trim_matches('-').chars().take(40).collect();
    if tools_schema::vm::validate_name("VM", &name).is_err() {
        return None;
    }
    let taken = d.call::<ops::VmShow>(&VmRef { vm: name.clone() }).await.is_ok();
    (!taken).then_some(name)
}
