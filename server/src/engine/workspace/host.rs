//! The host side of workspaces: the repository found and packed with git and tar (as its owner, beneath its top, no filters or hooks run), the changed-file lists parsed, a patch checked against it.
use super::*;

/// Settings that would run a program, each switched off for every host git command, whatever the
/// repository's or the owner's config says. Filter drivers have names of the config's choosing, so those
/// are found in the config first (`filter_overrides`).
pub(super) const NO_PROGRAMS: &[&str] = &[
    "core.fsmonitor=false",
    "core.hooksPath=/dev/null",
    "core.sshCommand=false",
    "core.gitProxy=",
    "core.askPass=",
    "core.alternateRefsCommand=",
    "core.pager=cat",
    "core.editor=false",
    "sequence.editor=false",
    "credential.helper=",
    "diff.external=",
    "gpg.program=false",
    "protocol.allow=never",
    "uploadpack.packObjectsHook=",
    "core.attributesFile=/dev/null",
];

/// `-c filter.<x>.clean=` etc. for every filter driver the effective config of `dir` names: an empty command
/// is no filter, and `required=false` keeps git from failing for want of it. Attributes (`* filter=x`) come
/// from the tree and cannot be switched off, but a driver without a command does nothing.
pub(super) async fn filter_overrides(dir: &Path, owner: RepoOwner) -> Result<Vec<String>, ApiError> {
    let out = run_git(dir, owner, &[], &["config", "--list", "--name-only", "-z"], b"").await?;
    let mut drivers = std::collections::BTreeSet::new();
    for key in out.stdout.split(|b| *b == 0) {
        let key = String::from_utf8_lossy(key).to_ascii_lowercase();
        if let Some(rest) = key.strip_prefix("filter.") {
            if let Some((name, _)) = rest.rsplit_once('.') {
                drivers.insert(name.to_string());
            }
        }
    }
    Ok(drivers
        .iter()
        .flat_map(|d| {
            ["clean=", "smudge=", "process=", "required=false"].map(|setting| format!("filter.{d}.{setting}"))
        })
        .collect())
}

/// Runs host git in `dir` as its owner with nothing from its config able to run a program.
pub(super) async fn host_git(dir: &Path, args: &[&str]) -> Result<std::process::Output, ApiError> {
    host_git_with_input(dir, args, b"").await
}

/// `host_git` with `input` on git's standard input.
pub(super) async fn host_git_with_input(
    dir: &Path,
    args: &[&str],
    input: &[u8],
) -> Result<std::process::Output, ApiError> {
    let owner = RepoOwner::of(dir)?;
    let filters = filter_overrides(dir, owner).await?;
    run_git(dir, owner, &filters, args, input).await
}

/// One git command as `owner`, in a clean environment: no system config or attributes, no prompts, no
/// variables of the daemon's (GIT_*, SSH_*, EDITOR...) reaching it; `extra` are more `-c` settings.
pub(super) async fn run_git(
    dir: &Path,
    owner: RepoOwner,
    extra: &[String],
    args: &[&str],
    input: &[u8],
) -> Result<std::process::Output, ApiError> {
    use tokio::io::AsyncWriteExt;
    let unavailable = |e: std::io::Error| {
        ApiError::new(ErrorCode::HostUnsupported, format!("cannot run git on the host: {e}"))
            .with_hint("install git on the daemon's host (apt-get install git)")
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", owner.home())
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_ATTR_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_OPTIONAL_LOCKS", "0");
    for setting in NO_PROGRAMS.iter().copied().chain(extra.iter().map(String::as_str)) {
        cmd.arg("-c").arg(setting);
    }
    if owner.switch() {
        // std clears the supplementary groups when a root parent sets the uid.
        cmd.uid(owner.uid).gid(owner.gid);
    }
    let mut child = cmd
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(unavailable)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A git that exits without reading its input is answered by its exit status, not by this write.
    let _ = stdin.write_all(input).await;
    drop(stdin);
    child.wait_with_output().await.map_err(unavailable)
}

pub(super) fn stdout_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub(super) fn stderr_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The top level of the git work tree at `path`, with a specific error for each way it is not one.
pub(crate) async fn work_tree_top(field: &str, path: &str) -> Result<PathBuf, ApiError> {
    let p = Path::new(path);
    match tokio::fs::metadata(p).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ApiError::invalid(format!("{field} `{path}` is not a directory"))
                .with_hint("give the folder of a git work tree"))
        }
        Err(e) => {
            return Err(ApiError::not_found(format!("{field} `{path}` cannot be read on the daemon's host: {e}"))
                .with_hint("give a path on the daemon's host that the daemon can read (it runs as its own user)"))
        }
    }
    let out = host_git(p, &["rev-parse", "--is-inside-work-tree", "--show-toplevel"]).await?;
    let text = stdout_line(&out);
    let mut lines = text.lines();
    if !out.status.success() || lines.next() != Some("true") {
        let why = stderr_text(&out);
        let why = if why.is_empty() { String::new() } else { format!(" (git: {why})") };
        return Err(ApiError::invalid(format!("{field} `{path}` is not inside a git work tree{why}"))
            .with_hint("name a directory of a git repository (one with a .git), or run `git init` there first"));
    }
    Ok(PathBuf::from(lines.next().unwrap_or(path)))
}

/// Packs the repository at `top` into `stage`: `history.pack` + `history.idx`, `tree.tar` (the files that differ from
/// HEAD), `deleted` and `changed` (both NUL-separated).
pub(crate) async fn pack(top: &Path, mode: WorkspaceMode, stage: &Path) -> Result<Packed, ApiError> {
    // git runs as the repository's owner and writes the pack here.
    RepoOwner::of(top)?.take(stage)?;
    let out = host_git(top, &["rev-parse", "-q", "--verify", "HEAD^{commit}"]).await?;
    if !out.status.success() {
        return Err(ApiError::precondition(format!("the repository {} has no commits yet", top.display()))
            .with_hint("commit something first: prepare copies the history and the working tree on top of it"));
    }
    let head = stdout_line(&out);
    let out = host_git(top, &["symbolic-ref", "-q", "--short", "HEAD"]).await?;
    let branch = Some(stdout_line(&out)).filter(|b| out.status.success() && !b.is_empty());

    // HEAD's history as one pack with its index, both made here: the guest, emulated and slow at hashing,
    // then need not index the pack itself (a bundle's fetch would: most of a prepare's time in the guest).
    let base = stage.join("pack");
    let out = host_git_with_input(top, &["pack-objects", "--revs", "-q", &base.to_string_lossy()], b"HEAD\n").await?;
    let checksum = stdout_line(&out);
    if !out.status.success() || checksum.len() < 40 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::internal(format!("git pack-objects failed in {}: {}", top.display(), stderr_text(&out)))
            .with_hint("run `git fsck` in the repository; the message is git's"));
    }
    for ext in ["pack", "idx"] {
        let made = stage.join(format!("pack-{checksum}.{ext}"));
        tokio::fs::rename(&made, stage.join(format!("history.{ext}"))).await.map_err(|e| {
            ApiError::internal(format!("moving {}: {e}", made.display()))
                .with_hint("check free space of the host's temporary directory ($TMPDIR or /tmp)")
        })?;
    }

    // The files whose working-tree copies go over the checkout: only what differs from HEAD (the checkout
    // has the rest), so the guest, emulated and slow at hashing, writes and hashes just those.
    // Submodules stay at HEAD's commits here (full mode copies their files below).
    let changed = [
        "--no-optional-locks",
        "diff",
        "--name-only",
        "-z",
        "--no-renames",
        "--no-ext-diff",
        "--no-textconv",
        "--ignore-submodules=all",
    ];
    let mut lists = vec![host_git(top, &[&changed[..], &["HEAD", "--"]].concat()).await?];
    let mut submodule_files = vec![];
    if mode == WorkspaceMode::Full {
        lists.push(host_git(top, &["ls-files", "-z", "--others", "--exclude-standard"]).await?);
        // Submodules' files are no blobs of HEAD: all of them go.
        let outer = host_git(top, &["ls-files", "-z", "--cached"]).await?;
        let all = host_git(top, &["ls-files", "-z", "--cached", "--recurse-submodules"]).await?;
        for out in [&outer, &all] {
            if !out.status.success() {
                return Err(ApiError::internal(format!(
                    "git ls-files failed in {}: {}",
                    top.display(),
                    stderr_text(out)
                ))
                .with_hint("run `git ls-files` in the repository; the message is git's"));
            }
        }
        let outer: std::collections::HashSet<&[u8]> = outer.stdout.split(|b| *b == 0).collect();
        submodule_files
            .extend(all.stdout.split(|b| *b == 0).filter(|n| !n.is_empty() && !outer.contains(n)).map(<[u8]>::to_vec));
    }
    let mut names: Vec<Vec<u8>> = submodule_files;
    for out in &lists {
        if !out.status.success() {
            return Err(ApiError::internal(format!(
                "listing the changed files of {} failed: {}",
                top.display(),
                stderr_text(out)
            ))
            .with_hint("run `git status` in the repository; the message is git's"));
        }
        names.extend(out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec));
    }
    names.sort();
    names.dedup();
    // Read by the daemon itself, every path resolved beneath the repository: a name whose parent is a symlink
    // (or that leaves the tree) is not a file of this work tree, whatever the path would reach (git sees it
    // the same way: deleted). tar -C would follow such a parent out of the repository.
    let (top_owned, tar_path) = (top.to_path_buf(), stage.join("tree.tar"));
    let archived = tokio::task::spawn_blocking(move || archive_beneath(&top_owned, &names, &tar_path))
        .await
        .map_err(|e| ApiError::internal(format!("archive task: {e}")).with_hint(crate::engine::errors::hint::BUG))?
        .map_err(|e| {
            ApiError::internal(format!("archiving {} failed: {e}", top.display()))
                .with_hint("a file may have changed or vanished while it was read; run prepare again")
        })?;
    let Archived { present, deleted, files } = archived;
    tokio::fs::write(stage.join("deleted"), &deleted).await.map_err(|e| {
        ApiError::internal(format!("writing a file list: {e}"))
            .with_hint("check free space of the host's temporary directory ($TMPDIR or /tmp)")
    })?;
    // What the guest must stage over HEAD besides the deleted paths: the copied files.
    tokio::fs::write(stage.join("changed"), present).await.map_err(|e| {
        ApiError::internal(format!("writing a file list: {e}"))
            .with_hint("check free space of the host's temporary directory ($TMPDIR or /tmp)")
    })?;
    Ok(Packed { top: top.to_path_buf(), head, branch, files, pack: format!("pack-{checksum}") })
}

/// What `archive_beneath` put into the tar and what it found gone, as NUL-separated path lists.
pub(super) struct Archived {
    present: Vec<u8>,
    deleted: Vec<u8>,
    files: u64,
}

/// Writes `names` (paths relative to `top`, from git) as a tar at `tar_path`: regular files with their
/// contents and executable bit, symlinks as links (their targets are only text, never followed). Each
/// path's directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from `top`, and the file
/// itself `O_NOFOLLOW`, so nothing outside the repository is ever read. A name that does not resolve that
/// way, or is no file or symlink (a directory, fifo, device), is listed as deleted.
pub(super) fn archive_beneath(top: &Path, names: &[Vec<u8>], tar_path: &Path) -> std::io::Result<Archived> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::{fstatat, Mode, SFlag};
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    let top_fd = nix::fcntl::open(top, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let beneath = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(tar_path)?));
    tar.follow_symlinks(false);
    let mut out = Archived { present: vec![], deleted: vec![], files: 0 };
    for name in names {
        let rel = Path::new(std::ffi::OsStr::from_bytes(name));
        let safe_name = !rel.is_absolute()
            && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
            && rel.file_name().is_some();
        let entry = if safe_name { read_beneath(&top_fd, &beneath, rel)? } else { None };
        let list = match entry {
            Some(Entry::File { data, mode, mtime }) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                h.set_mtime(mtime);
                tar.append_data(&mut h, rel, &data[..])?;
                out.files += 1;
                &mut out.present
            }
            Some(Entry::Link { target, mtime }) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                h.set_mtime(mtime);
                tar.append_link(&mut h, rel, Path::new(std::ffi::OsStr::from_bytes(&target)))?;
                out.files += 1;
                &mut out.present
            }
            None => &mut out.deleted,
        };
        list.extend_from_slice(name);
        list.push(0);
    }
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    return Ok(out);

    enum Entry {
        File { data: Vec<u8>, mode: u32, mtime: u64 },
        Link { target: Vec<u8>, mtime: u64 },
    }

    /// `rel` read beneath `top`; None when it is not a file or symlink of the work tree.
    fn read_beneath(top: &std::os::fd::OwnedFd, how: &OpenHow, rel: &Path) -> std::io::Result<Option<Entry>> {
        let gone = |e: nix::errno::Errno| match e {
            nix::errno::Errno::ENOENT
            | nix::errno::Errno::ENOTDIR
            | nix::errno::Errno::ELOOP
            | nix::errno::Errno::EXDEV => Ok(None),
            e => Err(std::io::Error::from(e)),
        };
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let leaf = rel.file_name().expect("checked by the caller");
        let dir = match nix::fcntl::openat2(top, parent, *how) {
            Ok(d) => d,
            Err(e) => return gone(e),
        };
        let st = match fstatat(&dir, leaf, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) => return gone(e),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let mtime = st.st_mtime.max(0) as u64;
        if kind == SFlag::S_IFLNK {
            return match nix::fcntl::readlinkat(&dir, leaf) {
                Ok(t) => Ok(Some(Entry::Link { target: t.as_bytes().to_vec(), mtime })),
                Err(e) => gone(e),
            };
        }
        if kind != SFlag::S_IFREG {
            return Ok(None);
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let fd = match nix::fcntl::openat(&dir, leaf, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => return gone(e),
        };
        let mut file = std::fs::File::from(fd);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut data)?;
        use std::os::unix::fs::PermissionsExt;
        Ok(Some(Entry::File { data, mode: meta.permissions().mode(), mtime }))
    }
}

/// `user.name` / `user.email` as the host repository sees them (its config, then the global one).
pub(super) async fn host_identity(top: &Path, key: &str) -> Result<Option<String>, ApiError> {
    let out = host_git(top, &["config", "--get", key]).await?;
    Ok(Some(stdout_line(&out)).filter(|v| out.status.success() && !v.is_empty()))
}

/// `key=value` lines printed by a guest script.
pub(super) fn script_value<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Parses `git diff --name-status -z` output.
pub(crate) fn parse_name_status(raw: &[u8]) -> Vec<ChangedFile> {
    let mut fields = raw.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
    let mut files = vec![];
    while let Some(status) = fields.next() {
        let kind = match status.chars().next() {
            Some('A') => ChangeKind::Added,
            Some('M') => ChangeKind::Modified,
            Some('D') => ChangeKind::Deleted,
            Some('R') => ChangeKind::Renamed,
            Some('C') => ChangeKind::Copied,
            Some('T') => ChangeKind::TypeChanged,
            _ => continue,
        };
        let Some(first) = fields.next() else { break };
        if matches!(kind, ChangeKind::Renamed | ChangeKind::Copied) {
            let to = fields.next().unwrap_or_default();
            files.push(ChangedFile { status: kind, path: to, from: Some(first) });
        } else {
            files.push(ChangedFile { status: kind, path: first, from: None });
        }
    }
    files
}

/// Runs `git apply --check` for `patch` in the host repository `top`.
pub(crate) async fn apply_check(top: &Path, patch: &[u8]) -> Result<ApplyCheck, ApiError> {
    let head = stdout_line(&host_git(top, &["rev-parse", "-q", "--verify", "HEAD"]).await?);
    // On stdin: git runs as the repository's owner, who could not read a file of the daemon's.
    let out = host_git_with_input(top, &["apply", "--check", "-"], patch).await?;
    let conflicts: Vec<String> = stderr_text(&out)
        .lines()
        .map(|l| l.strip_prefix("error: ").unwrap_or(l).to_string())
        .filter(|l| !l.is_empty())
        .collect();
    // An empty patch is trivially clean; git apply refuses it ("No valid patches in input").
    let clean = out.status.success() || patch.is_empty();
    Ok(ApplyCheck {
        repo: top.display().to_string(),
        host_head: head,
        clean,
        conflicts: if clean { vec![] } else { conflicts },
    })
}
