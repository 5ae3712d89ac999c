//! `banger vm workspace prepare|export`: a host git repository into a VM, and the VM's changes back as a
//! patch. Paths are canonicalised here (the CLI runs as the user, in the user's directory); the daemon
//! validates them again.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::Subcommand;
use sha2::Digest;
use tools_schema::ops;
use tools_schema::vm::{ContentEncoding, VmFileReadParams};
use tools_schema::workspace::{WorkspaceExportParams, WorkspaceExportResult, WorkspaceMode, WorkspacePrepareParams};

use crate::client::Daemon;
use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum WorkspaceCmd {
    /// Copy a host git repository into the VM at /root/repo (history, HEAD and working-tree edits).
    #[command(
        after_help = "Examples:\n  banger vm workspace prepare dev\n  banger vm workspace prepare dev ~/src/app --full\n  \
                            banger vm workspace prepare dev . --force   # replace the guest's /root/repo"
    )]
    Prepare {
        vm: String,
        /// The host repository (default: the current directory).
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Also copy untracked (not ignored) files and submodule contents.
        #[arg(long)]
        full: bool,
        /// Replace a non-empty /root/repo in the guest (its uncommitted and unexported work is lost).
        #[arg(long)]
        force: bool,
    },
    /// Everything the VM changed in /root/repo since prepare, as one patch for `git apply`.
    #[command(
        after_help = "Writes the patch to stdout (a summary goes to stderr) or to --output. With --check, exits 2 \
                            when the patch does not apply cleanly to the host repository.\n\nExamples:\n  \
                            banger vm workspace export dev | git apply\n  \
                            banger vm workspace export dev --output changes.patch --check\n  \
                            banger vm workspace export dev --base HEAD~3 --json"
    )]
    Export {
        vm: String,
        /// Commit in the guest repository to diff against (default: the base recorded by prepare).
        #[arg(long)]
        base: Option<String>,
        /// Write the patch to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Check that the patch applies cleanly to this host repository (default: the current directory).
        #[arg(long, num_args = 0..=1, default_missing_value = ".")]
        check: Option<PathBuf>,
        /// Then delete the VM, if the whole patch came back (and, with --check, applies cleanly).
        #[arg(long)]
        delete: bool,
    },
}

fn canonical(what: &str, p: &Path) -> anyhow::Result<String> {
    let c = std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("cannot use {what} {}: {e}", p.display()))?;
    c.to_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{what} {} is not valid UTF-8", c.display()))
}

/// `git config --get KEY` in `repo` as the user running the CLI, so their global config counts. Reading
/// config runs nothing, so a repository owned by someone else (safe.directory) may be read too; otherwise its
/// own identity would be skipped for the reader's global one.
fn user_git_config(repo: &str, key: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C", repo, "config", "--get", key])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The prepare request for a host path, with the identity the user running the CLI would commit as.
pub fn prepare_params(vm: String, path: &Path, full: bool, force: bool) -> anyhow::Result<WorkspacePrepareParams> {
    let path = canonical("repository", path)?;
    let p = WorkspacePrepareParams {
        vm,
        git_user_name: user_git_config(&path, "user.name"),
        git_user_email: user_git_config(&path, "user.email"),
        path,
        mode: Some(if full { WorkspaceMode::Full } else { WorkspaceMode::Tracked }),
        force,
    };
    p.validate().map_err(|e| anyhow::anyhow!(e))?;
    Ok(p)
}

pub async fn run(cmd: WorkspaceCmd, d: &Daemon, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkspaceCmd::Prepare { vm, path, full, force } => {
            let p = prepare_params(vm, &path, full, force)?;
            let r = d.call::<ops::WorkspacePrepare>(&p).await?;
            if ctx.json {
                output::json(&r);
            } else {
                println!(
                    "{} -> {}:{} ({} mode, {} changed files copied over HEAD, {} bytes)",
                    r.source,
                    r.vm,
                    r.path,
                    r.mode.as_str(),
                    r.files,
                    r.bytes
                );
                println!("  head:   {}{}", r.head_commit, r.branch.map(|b| format!(" ({b})")).unwrap_or_default());
                if r.host_dirty {
                    println!("  base:   {} (snapshot of the host's uncommitted files)", r.base_commit);
                }
                if let (Some(n), Some(e)) = (&r.git_user_name, &r.git_user_email) {
                    println!("  author: {n} <{e}>");
                }
                println!("  bring changes back: banger vm workspace export {} | git apply", r.vm);
            }
        }
        WorkspaceCmd::Export { vm, base, output: out_path, check, delete } => {
            let p = WorkspaceExportParams {
                vm,
                base,
                check_repo: check.as_deref().map(|c| canonical("repository", c)).transpose()?,
                max_inline_bytes: None,
                delete,
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            let r = d.call::<ops::WorkspaceExport>(&p).await?;
            let patch = patch_bytes(d, &r).await?;
            if let Some(path) = &out_path {
                let write = || {
                    let mut f = crate::host_file::create_beside(path)?;
                    f.write_all(&patch)?;
                    f.commit(crate::host_file::safe_mode(None))
                };
                write().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            if ctx.json {
                output::json(&r);
            } else {
                if out_path.is_none() {
                    std::io::stdout().write_all(&patch)?;
                }
                summary(&r, out_path.as_deref());
            }
            if r.check.as_ref().is_some_and(|c| !c.clean) {
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The whole patch: inline, or read from the guest in chunks and checked against its sha256.
async fn patch_bytes(d: &Daemon, r: &WorkspaceExportResult) -> anyhow::Result<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = match (&r.patch, r.patch_encoding) {
        (Some(p), Some(ContentEncoding::Base64)) => b64.decode(p)?,
        (Some(p), _) => p.clone().into_bytes(),
        (None, _) => {
            let mut data = vec![];
            while (data.len() as u64) < r.patch_bytes {
                let chunk = d
                    .call::<ops::VmFileRead>(&VmFileReadParams {
                        vm: r.vm.clone(),
                        path: r.patch_path.clone(),
                        offset: Some(data.len() as u64),
                        limit: None,
                        encoding: Some(ContentEncoding::Base64),
                    })
                    .await?;
                let bytes = b64.decode(chunk.content.as_bytes())?;
                if bytes.is_empty() {
                    break;
                }
                data.extend_from_slice(&bytes);
            }
            data
        }
    };
    let sha = hex::encode(sha2::Sha256::digest(&data));
    if sha != r.patch_sha256 {
        anyhow::bail!(
            "the patch read back ({} bytes, sha256 {sha}) is not the one exported ({} bytes, sha256 {})\n  hint: \
             another export replaced it; export again",
            data.len(),
            r.patch_bytes,
            r.patch_sha256
        );
    }
    Ok(data)
}

fn summary(r: &WorkspaceExportResult, out: Option<&Path>) {
    let mut lines = vec![format!(
        "{} files changed in {} since {} ({}), guest HEAD {}, patch {} bytes{}",
        r.files.len(),
        r.vm,
        r.base_ref,
        short(&r.base_commit),
        short(&r.guest_head),
        r.patch_bytes,
        out.map(|p| format!(" -> {}", p.display())).unwrap_or_default()
    )];
    for f in &r.files {
        let status =
            serde_json::to_value(f.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        match &f.from {
            Some(from) => lines.push(format!("  {status:<9} {from} -> {}", f.path)),
            None => lines.push(format!("  {status:<9} {}", f.path)),
        }
    }
    if r.ignored_count > 0 {
        lines.push(format!("  not in the patch ({} ignored by .gitignore): {}", r.ignored_count, r.ignored.join(", ")));
    }
    if let Some(c) = &r.check {
        if c.clean {
            lines.push(format!("applies cleanly to {} (HEAD {})", c.repo, short(&c.host_head)));
        } else {
            lines.push(format!("does NOT apply cleanly to {} (HEAD {}):", c.repo, short(&c.host_head)));
            lines.extend(c.conflicts.iter().map(|l| format!("  {l}")));
        }
    }
    if r.deleted {
        lines.push(format!("deleted VM {}", r.vm));
    } else if let Some(why) = &r.kept_because {
        lines.push(format!("kept VM {}: {why}", r.vm));
    }
    // With the patch on stdout, everything else goes to stderr so `| git apply` gets only the patch.
    // File names, ignored names and conflict lines come from the guest's repository.
    for l in lines {
        let l = crate::output::term_line(&l);
        if out.is_some() {
            println!("{l}");
        } else {
            eprintln!("{l}");
        }
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
