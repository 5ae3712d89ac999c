//! `workspace.prepare` and `workspace.export`: a host git repository copied into a guest, and everything
//! the guest changed brought back as one patch.
//!
//! Prepare packs the host repository on the host (a pack of HEAD's history with its index, so the guest has
//! the real history and the same HEAD hash without indexing anything, plus a tar of the working-tree copies
//! of the files that differ from HEAD), writes both into
//! the guest with the agent's file writes, and runs `PREPARE_SCRIPT` there. The script records the base
//! commit as `refs/banger/base`: HEAD itself when the copied tree equals HEAD, else a snapshot commit on top
//! of HEAD holding exactly the tree the guest started from (made in a temporary index, so the guest's HEAD,
//! index and working tree mirror the host's).
//!
//! Export runs `EXPORT_SCRIPT`: `git add -A` into a temporary index (the agent's own staging is untouched)
//! and `git diff --cached --binary --full-index <base>`, which captures the guest's commits, uncommitted
//! edits and untracked files in one patch. Diffing against the guest's HEAD instead would lose its commits.
//! The patch is kept in the guest and read back in chunks; it comes back inline only up to a limit, and is
//! never cut.
//!
//! The daemon runs as root while repositories belong to users, so every host git command carries
//! `-c safe.directory=*`. The guest scripts are ordinary multi-line shell text run with `sh -c`, arguments
//! passed as positional parameters (never spliced into the script), and the unit tests below run them
//! against real repositories on the host.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tools_schema::guest::ExecSpec;
use tools_schema::vm::{VmInfo, MAX_FILE_CHUNK};
use tools_schema::workspace::{
    ApplyCheck, ChangeKind, ChangedFile, WorkspaceExportParams, WorkspaceExportResult, WorkspaceMode,
    WorkspacePrepareParams, WorkspacePrepareResult, BASE_REF, DEFAULT_INLINE_PATCH, GUEST_REPO,
};
use tools_schema::{ApiError, ErrorCode};

use super::operation::Op;
use super::{CallContext, Engine, ProgressSink};
use crate::guest::{ExecOutput, GuestConn, GuestError};
use crate::store::VmRow;

/// Guest directory for prepare's uploads and export's patch; on the work disk, outside the repository.
const GUEST_STAGE: &str = "/root/.banger-workspace";
/// Guest scripts get this long; big repositories under software emulation are slow.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(1800);
/// Largest stdout a workspace script may print (the changed-file lists); more is an error, never a cut.
const SCRIPT_OUTPUT_LIMIT: usize = 64 << 20;
/// At most this many ignored names are listed in an export result.
const MAX_IGNORED_LISTED: usize = 1000;
/// Most the host reads of an export's changed-file and ignored-file lists (NUL-separated paths).
const MAX_FILE_LIST: u64 = 16 << 20;
/// Most of a patch the host holds in memory (to check it against the host repository, or to inline it).
const MAX_HOST_PATCH: u64 = 512 << 20;

const PREPARE_STAGES: &[&str] = &["check", "pack", "transfer", "unpack"];
const EXPORT_STAGES: &[&str] = &["diff", "fetch", "check"];

/// Exit code of PREPARE_SCRIPT when the repository directory is not empty and force was not given.
const EXIT_REPO_EXISTS: i32 = 3;
/// Exit codes of EXPORT_SCRIPT: no repository, base not a commit.
const EXIT_NO_REPO: i32 = 3;
const EXIT_BAD_BASE: i32 = 4;

/// Runs in the guest: `sh -c PREPARE_SCRIPT sh REPO STAGE HEAD BRANCH MODE FORCE NAME EMAIL PACK`.
/// STAGE holds `history.pack` + `history.idx` (HEAD's history, to become PACK in the repository's object
/// store), `tree.tar` (the files that differ from HEAD), `deleted` and `changed` (the paths to remove from
/// and to stage over HEAD: the deleted and the copied ones; NUL-separated). Prints `key=value` lines.
/// On any failure it removes what it made and puts a replaced repository back.
pub(crate) const PREPARE_SCRIPT: &str = r#"set -eu
repo=$1 stage=$2 head=$3 branch=$4 mode=$5 force=$6 name=$7 email=$8 pack=$9
old="$repo.banger-replaced"
done=0 replaced=0
cleanup() {
    if [ "$done" != 1 ]; then
        rm -rf "$repo"
        if [ -e "$old" ]; then mv "$old" "$repo"; fi
    else
        rm -rf "$old"
    fi
    rm -rf "$stage"
}
trap cleanup EXIT
rm -rf "$old"
if [ -e "$repo" ] && [ -n "$(ls -A "$repo" 2>/dev/null)" ]; then
    if [ "$force" != 1 ]; then
        done=1
        echo "banger: $repo already exists and is not empty" >&2
        exit 3
    fi
    mv "$repo" "$old"
    replaced=1
fi
rm -rf "$repo"
mkdir -p "$repo"
cd "$repo"
git init -q
git config advice.detachedHead false
mv "$stage/history.pack" ".git/objects/pack/$pack.pack"
mv "$stage/history.idx" ".git/objects/pack/$pack.idx"
if [ "$(git rev-parse -q --verify "$head^{commit}" || true)" != "$head" ]; then
    echo "banger: the pack does not hold $head" >&2
    exit 1
fi
if [ -n "$branch" ]; then
    git checkout -q -B "$branch" "$head"
else
    git checkout -q --detach "$head"
fi
# Deletions first: a directory the host replaced (by a symlink or a file) must be gone, with any directory
# it leaves empty, before the tar brings what replaced it.
if [ -s "$stage/deleted" ]; then
    xargs -0 rm -f -- < "$stage/deleted"
    xargs -0 dirname -z -- < "$stage/deleted" | sort -zu | grep -zvx . \
        | xargs -0 -r rmdir -p --ignore-fail-on-non-empty -- 2>/dev/null || true
fi
tar -xf "$stage/tree.tar" --no-same-owner -C "$repo"
if [ -n "$name" ]; then git config user.name "$name"; fi
if [ -n "$email" ]; then git config user.email "$email"; fi
idx=$(mktemp)
export GIT_INDEX_FILE="$idx"
git read-tree HEAD
if [ "$mode" = full ]; then
    # Submodule contents were copied as plain files: record them so, not as submodule links.
    git -c core.quotepath=off ls-files -s | grep '^160000' | cut -f2- | while IFS= read -r p; do
        git rm -q --cached -- "$p"
    done
fi
# Only the listed paths are hashed: update-index takes them literally (no pathspec magic), adds what
# exists (--replace: a symlink or file where HEAD has a directory, and the other way round),
# and drops what does not.
# Deleted paths go first, by force: one under a directory the host replaced by a symlink is "beyond a
# symbolic link" for a plain --remove.
if [ -s "$stage/deleted" ]; then
    git update-index --force-remove -z --stdin < "$stage/deleted"
fi
if [ -s "$stage/changed" ]; then
    git update-index --add --remove --replace -z --stdin < "$stage/changed"
fi
tree=$(git write-tree)
unset GIT_INDEX_FILE
rm -f "$idx"
if [ "$tree" = "$(git rev-parse 'HEAD^{tree}')" ]; then
    base=$head
    dirty=0
else
    base=$(git -c user.name="${name:-banger}" -c user.email="${email:-banger@localhost}" \
        commit-tree "$tree" -p HEAD -m "banger: the host working tree copied by workspace prepare")
    dirty=1
fi
git update-ref refs/banger/base "$base"
done=1
printf 'head=%s\nbase=%s\ndirty=%s\nreplaced=%s\n' "$(git rev-parse HEAD)" "$base" "$dirty" "$replaced"
"#;

/// Runs in the guest after a cancelled or failed prepare whose script could not clean up (it was killed):
/// `sh -c ROLLBACK_SCRIPT sh REPO STAGE WAS_EMPTY`. Puts a replaced repository back, or removes a new one
/// when REPO was empty before.
const ROLLBACK_SCRIPT: &str = r#"set -u
repo=$1 stage=$2 was_empty=$3
old="$repo.banger-replaced"
if [ -e "$old" ]; then
    rm -rf "$repo"
    mv "$old" "$repo"
elif [ "$was_empty" = 1 ]; then
    rm -rf "$repo"
fi
rm -rf "$stage"
"#;

/// Runs in the guest: `sh -c EXPORT_SCRIPT sh REPO BASE OUT`. Writes the patch to OUT, the changed files
/// (`git diff --name-status -z`) to OUT.files and ignored untracked names to OUT.ignored, then prints
/// `base=`, `head=` lines.
pub(crate) const EXPORT_SCRIPT: &str = r#"set -eu
repo=$1 base=$2 out=$3
if ! cd "$repo" 2>/dev/null || [ "$(git rev-parse --show-toplevel 2>/dev/null)" != "$(pwd -P)" ]; then
    echo "banger: $repo is not a git repository" >&2
    exit 3
fi
if ! basec=$(git rev-parse -q --verify "$base^{commit}"); then
    echo "banger: $base is not a commit in $repo" >&2
    exit 4
fi
head=$(git rev-parse -q --verify HEAD || true)
mkdir -p "$(dirname "$out")"
idx=$(mktemp)
trap 'rm -f "$idx" "$out.tmp"' EXIT
# A copy of the agent's index (keeps files it force-added), so its own staging is never disturbed.
if ! cp "$(git rev-parse --git-path index)" "$idx" 2>/dev/null; then
    rm -f "$idx"
    GIT_INDEX_FILE="$idx" git read-tree --empty
fi
export GIT_INDEX_FILE="$idx"
# Where the base holds plain files at a submodule link (full-mode prepare), compare plain files.
git -c core.quotepath=off ls-files -s | grep '^160000' | cut -f2- | while IFS= read -r p; do
    if [ "$(git cat-file -t "$basec:$p" 2>/dev/null)" = tree ]; then git rm -q --cached -- "$p"; fi
done
git add -A
git -c core.quotepath=off diff --cached --binary --full-index --no-color --no-ext-diff --no-textconv -M \
    "$basec" > "$out.tmp"
git diff --cached --name-status -z --no-ext-diff -M "$basec" > "$out.files"
git ls-files -z --others --ignored --exclude-standard --directory > "$out.ignored"
mv "$out.tmp" "$out"
printf 'base=%s\nhead=%s\n' "$basec" "$head"
"#;

/// Reports an operation's stages to `operation.status` and, when the caller asked, as progress.
struct Stages {
    op: Arc<Op>,
    progress: Option<Arc<dyn ProgressSink>>,
    names: &'static [&'static str],
    target: String,
}

impl Stages {
    fn enter(&self, name: &str) {
        self.op.stage(name);
        self.report(name, 0.5);
    }

    /// Progress within the running stage, `fraction` of it done.
    fn report(&self, name: &str, fraction: f64) {
        if let Some(p) = &self.progress {
            let index = self.names.iter().position(|n| *n == name).unwrap_or(0) as f64;
            p.report(index + fraction.clamp(0.0, 1.0), self.names.len() as f64, format!("{}: {name}", self.target));
        }
    }
}

/// The host side of prepare: what was packed for the guest.
#[derive(Debug)]
pub(crate) struct Packed {
    pub top: PathBuf,
    pub head: String,
    pub branch: Option<String>,
    pub files: u64,
    /// The pack's name in the guest's `.git/objects/pack` (`pack-<checksum>`).
    pub pack: String,
}

/// Who host git runs as: the owner of the directory it runs in, so a repository (its config, its hooks, a
/// `.git` file pointing elsewhere, a symlink in its tree) can never make the daemon read or run anything with
/// more rights than the repository's own user has. Only a root daemon can switch; otherwise git runs as the
/// daemon's user, who has no more rights than that anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RepoOwner {
    uid: u32,
    gid: u32,
}

impl RepoOwner {
    fn of(dir: &Path) -> Result<RepoOwner, ApiError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir).map_err(|e| {
            ApiError::not_found(format!("`{}` cannot be read on the daemon's host: {e}", dir.display()))
        })?;
        Ok(RepoOwner { uid: m.uid(), gid: m.gid() })
    }

    /// Whether commands must switch to this owner (the daemon is root and the owner is someone else).
    fn switch(&self) -> bool {
        nix::unistd::geteuid().is_root() && self.uid != 0
    }

    /// The owner's home directory (their global git config: identity), or `/` when they have none.
    fn home(&self) -> PathBuf {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.dir)
            .unwrap_or_else(|| PathBuf::from("/"))
    }

    /// Gives a directory the daemon made (a stage git writes into) to the owner.
    fn take(&self, dir: &Path) -> Result<(), ApiError> {
        if !self.switch() {
            return Ok(());
        }
        nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(self.uid)), Some(nix::unistd::Gid::from_raw(self.gid)))
            .map_err(|e| ApiError::internal(format!("handing {} to the repository's owner: {e}", dir.display())))
    }
}

/// Settings that would run a program, each switched off for every host git command, whatever the
/// repository's or the owner's config says. Filter drivers have names of the config's choosing, so those
/// are found in the config first (`filter_overrides`).
const NO_PROGRAMS: &[&str] = &[
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
async fn filter_overrides(dir: &Path, owner: RepoOwner) -> Result<Vec<String>, ApiError> {
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
async fn host_git(dir: &Path, args: &[&str]) -> Result<std::process::Output, ApiError> {
    host_git_with_input(dir, args, b"").await
}

/// `host_git` with `input` on git's standard input.
async fn host_git_with_input(dir: &Path, args: &[&str], input: &[u8]) -> Result<std::process::Output, ApiError> {
    let owner = RepoOwner::of(dir)?;
    let filters = filter_overrides(dir, owner).await?;
    run_git(dir, owner, &filters, args, input).await
}

/// One git command as `owner`, in a clean environment: no system config or attributes, no prompts, no
/// variables of the daemon's (GIT_*, SSH_*, EDITOR...) reaching it; `extra` are more `-c` settings.
async fn run_git(
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

fn stdout_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// The top level of the git work tree at `path`, with a specific error for each way it is not one.
pub(crate) async fn work_tree_top(field: &str, path: &str) -> Result<PathBuf, ApiError> {
    let p = Path::new(path);
    match tokio::fs::metadata(p).await {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ApiError::invalid(format!("{field} `{path}` is not a directory"))),
        Err(e) => {
            return Err(ApiError::not_found(format!("{field} `{path}` cannot be read on the daemon's host: {e}")))
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
        return Err(ApiError::internal(format!("git pack-objects failed in {}: {}", top.display(), stderr_text(&out))));
    }
    for ext in ["pack", "idx"] {
        let made = stage.join(format!("pack-{checksum}.{ext}"));
        tokio::fs::rename(&made, stage.join(format!("history.{ext}")))
            .await
            .map_err(|e| ApiError::internal(format!("moving {}: {e}", made.display())))?;
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
                )));
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
            )));
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
        .map_err(|e| ApiError::internal(format!("archive task: {e}")))?
        .map_err(|e| {
            ApiError::internal(format!("archiving {} failed: {e}", top.display()))
                .with_hint("a file may have changed or vanished while it was read; run prepare again")
        })?;
    let Archived { present, deleted, files } = archived;
    tokio::fs::write(stage.join("deleted"), &deleted)
        .await
        .map_err(|e| ApiError::internal(format!("writing a file list: {e}")))?;
    // What the guest must stage over HEAD besides the deleted paths: the copied files.
    tokio::fs::write(stage.join("changed"), present)
        .await
        .map_err(|e| ApiError::internal(format!("writing a file list: {e}")))?;
    Ok(Packed { top: top.to_path_buf(), head, branch, files, pack: format!("pack-{checksum}") })
}

/// What `archive_beneath` put into the tar and what it found gone, as NUL-separated path lists.
struct Archived {
    present: Vec<u8>,
    deleted: Vec<u8>,
    files: u64,
}

/// Writes `names` (paths relative to `top`, from git) as a tar at `tar_path`: regular files with their
/// contents and executable bit, symlinks as links (their targets are only text, never followed). Each
/// path's directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from `top`, and the file
/// itself `O_NOFOLLOW`, so nothing outside the repository is ever read. A name that does not resolve that
/// way, or is no file or symlink (a directory, fifo, device), is listed as deleted.
fn archive_beneath(top: &Path, names: &[Vec<u8>], tar_path: &Path) -> std::io::Result<Archived> {
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
async fn host_identity(top: &Path, key: &str) -> Result<Option<String>, ApiError> {
    let out = host_git(top, &["config", "--get", key]).await?;
    Ok(Some(stdout_line(&out)).filter(|v| out.status.success() && !v.is_empty()))
}

/// `key=value` lines printed by a guest script.
fn script_value<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
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

fn guest_failure(vm: &str, what: &str, out: &ExecOutput) -> ApiError {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.timed_out {
        return ApiError::new(ErrorCode::Timeout, format!("VM {vm}: {what} timed out"));
    }
    ApiError::internal(format!("VM {vm}: {what} failed ({:?}): {stderr}", out.status.code))
        .with_hint(format!("`banger vm exec {vm} -- git -C {GUEST_REPO} status` shows the guest repository"))
}

fn guest_err(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Cancelled => ApiError::new(ErrorCode::Cancelled, "cancelled by the caller"),
        other => ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: {}", super::vm::error_chain(&other)))
            .with_hint(format!("`banger vm logs {vm}` shows the guest console")),
    }
}

/// Runs a workspace script in the guest with its arguments as positional parameters.
async fn run_script(
    conn: &GuestConn,
    vm: &str,
    script: &str,
    args: &[&str],
    cancel: &CancellationToken,
) -> Result<ExecOutput, ApiError> {
    let mut argv = vec!["sh".to_string(), "-c".to_string(), script.to_string(), "sh".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let spec = ExecSpec { argv, env: Default::default(), cwd: Some("/".into()), stdin: false, timeout_ms: None };
    let spec = ExecSpec { timeout_ms: Some(SCRIPT_TIMEOUT.as_millis() as u64), ..spec };
    let out = tokio::time::timeout(
        SCRIPT_TIMEOUT + Duration::from_secs(15),
        conn.exec(spec, None, SCRIPT_OUTPUT_LIMIT, cancel),
    )
    .await
    .map_err(|_| ApiError::new(ErrorCode::Timeout, format!("VM {vm}: the guest did not answer")))?
    .map_err(|e| guest_err(vm, e))?;
    if out.stdout_truncated {
        return Err(ApiError::internal(format!(
            "VM {vm}: a workspace script printed more than {SCRIPT_OUTPUT_LIMIT} bytes"
        )));
    }
    Ok(out)
}

/// Reads a whole guest file in chunks of the file-read limit, at most `max_bytes` of it: the size the
/// guest reports is only a progress hint, never an allocation (a guest can claim any size, or grow the file
/// while it is read).
async fn read_guest_file(
    conn: &GuestConn,
    vm: &str,
    path: &str,
    max_bytes: u64,
    cancel: &CancellationToken,
    mut on_chunk: impl FnMut(u64, u64),
) -> Result<Vec<u8>, ApiError> {
    let mut data = vec![];
    loop {
        if data.len() as u64 >= max_bytes {
            return Err(ApiError::internal(format!(
                "VM {vm}: {path} is larger than the {max_bytes} bytes the host reads of it"
            ))
            .with_hint("the guest changed or replaced a file banger wrote; re-run the export"));
        }
        if cancel.is_cancelled() {
            return Err(ApiError::new(ErrorCode::Cancelled, "cancelled by the caller"));
        }
        let (chunk, size, _) = conn
            .read_file(path, data.len() as u64, MAX_FILE_CHUNK.min(max_bytes - data.len() as u64).max(1), cancel)
            .await
            .map_err(|e| guest_err(vm, e))?;
        let empty = chunk.is_empty();
        data.extend_from_slice(&chunk);
        on_chunk(data.len() as u64, size);
        if data.len() as u64 >= size || empty {
            return Ok(data);
        }
    }
}

impl Engine {
    /// The operation for a workspace call.
    fn workspace_op(&self, kind: &str, vm: &str, names: &'static [&'static str], ctx: &CallContext) -> Stages {
        let op = self.ops.start(kind, vm, names);
        Stages { op, progress: ctx.progress.clone(), names, target: vm.to_string() }
    }

    /// Runs `work` through the operation runner, under the VM's lock: a caller that cancels or disconnects
    /// cancels it instead of dropping it half-way, and the work still rolls back and records the outcome.
    async fn run_workspace_op<T: Send + 'static>(
        self: &Arc<Self>,
        stages: Arc<Stages>,
        row: VmRow,
        ctx: &CallContext,
        work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        let engine = self.clone();
        let lock = self.vm_lock(&row.id);
        let work = async move {
            let _held = lock.lock_owned().await;
            let result = work.await?;
            Ok((result, engine.vm_info(&row).await))
        };
        let task = super::operation::run(&stages.op, work, |(_, vm): &(T, VmInfo)| vm.clone().into());
        super::operation::join(&stages.op, task, ctx).await.map(|(result, _)| result)
    }

    pub async fn workspace_prepare(
        self: &Arc<Self>,
        p: WorkspacePrepareParams,
        ctx: CallContext,
    ) -> Result<WorkspacePrepareResult, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let top = work_tree_top("path", &p.path).await?;
        let stages = Arc::new(self.workspace_op("workspace.prepare", &row.name, PREPARE_STAGES, &ctx));
        let (engine, task_row, task_stages) = (self.clone(), row.clone(), stages.clone());
        let work = async move { engine.prepare_inner(&task_row, &conn, &top, p, &task_stages).await };
        self.run_workspace_op(stages, row, &ctx, work).await
    }

    async fn prepare_inner(
        &self,
        row: &VmRow,
        conn: &GuestConn,
        top: &Path,
        p: WorkspacePrepareParams,
        stages: &Stages,
    ) -> Result<WorkspacePrepareResult, ApiError> {
        let cancel = stages.op.cancel.clone();
        let cancelled =
            || ApiError::new(ErrorCode::Cancelled, "workspace prepare was cancelled; the guest is as it was");
        let mode = p.mode.unwrap_or_default();
        stages.enter("check");
        // Refuse early, before packing anything, when the guest already has work in /root/repo.
        let probe = run_script(
            conn,
            &row.name,
            "[ -e \"$1\" ] && [ -n \"$(ls -A \"$1\" 2>/dev/null)\" ] && echo occupied || true",
            &[GUEST_REPO],
            &cancel,
        )
        .await?;
        let occupied = String::from_utf8_lossy(&probe.stdout).trim() == "occupied";
        if occupied && !p.force {
            return Err(repo_exists(&row.name));
        }
        stages.enter("pack");
        let local = tempfile::Builder::new()
            .prefix("banger-prepare-")
            .tempdir()
            .map_err(|e| ApiError::internal(format!("temporary directory: {e}")))?;
        let packed = pack(top, mode, local.path()).await?;
        let git_user_name = match p.git_user_name {
            Some(n) => Some(n),
            None => host_identity(top, "user.name").await?,
        };
        let git_user_email = match p.git_user_email {
            Some(e) => Some(e),
            None => host_identity(top, "user.email").await?,
        };
        if cancel.is_cancelled() {
            return Err(cancelled());
        }

        stages.enter("transfer");
        let stage = format!("{GUEST_STAGE}/prepare-{}", super::new_id());
        let uploads = ["history.pack", "history.idx", "tree.tar", "deleted", "changed"];
        let mut sizes = vec![];
        for name in uploads {
            sizes.push(std::fs::metadata(local.path().join(name)).map(|m| m.len()).unwrap_or(0));
        }
        let total: u64 = sizes.iter().sum();
        let mut sent = 0u64;
        let result = async {
            for name in uploads {
                let data = tokio::fs::read(local.path().join(name))
                    .await
                    .map_err(|e| ApiError::internal(format!("reading {name}: {e}")))?;
                let path = format!("{stage}/{name}");
                let mut first = true;
                for chunk in data.chunks(MAX_FILE_CHUNK as usize).chain(data.is_empty().then_some(&[][..])) {
                    if cancel.is_cancelled() {
                        return Err(cancelled());
                    }
                    conn.write_file(&path, Some(0o600), !first, chunk, &cancel)
                        .await
                        .map_err(|e| guest_err(&row.name, e))?;
                    first = false;
                    sent += chunk.len() as u64;
                    stages.report("transfer", sent as f64 / total.max(1) as f64);
                }
            }
            stages.enter("unpack");
            let force = if p.force { "1" } else { "0" };
            let out = run_script(
                conn,
                &row.name,
                PREPARE_SCRIPT,
                &[
                    GUEST_REPO,
                    &stage,
                    &packed.head,
                    packed.branch.as_deref().unwrap_or(""),
                    mode.as_str(),
                    force,
                    git_user_name.as_deref().unwrap_or(""),
                    git_user_email.as_deref().unwrap_or(""),
                    &packed.pack,
                ],
                &cancel,
            )
            .await?;
            if out.status.code == Some(EXIT_REPO_EXISTS) {
                return Err(repo_exists(&row.name));
            }
            if out.status.code != Some(0) {
                return Err(guest_failure(&row.name, "unpacking the repository", &out));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        .await;
        let stdout = match result {
            Ok(s) => s,
            Err(e) if e.code == ErrorCode::AlreadyExists => return Err(e),
            Err(e) => {
                let was_empty = if occupied { "0" } else { "1" };
                // The script cleans up after itself unless it was killed; make sure, with a fresh token.
                let _ = run_script(
                    conn,
                    &row.name,
                    ROLLBACK_SCRIPT,
                    &[GUEST_REPO, &stage, was_empty],
                    &CancellationToken::new(),
                )
                .await;
                return Err(if cancel.is_cancelled() { cancelled() } else { e });
            }
        };
        let value = |k: &str| script_value(&stdout, k).map(str::to_string);
        let head_commit =
            value("head").ok_or_else(|| ApiError::internal(format!("prepare printed no head: {stdout}")))?;
        let base_commit =
            value("base").ok_or_else(|| ApiError::internal(format!("prepare printed no base: {stdout}")))?;
        tracing::info!(vm = %row.name, source = %top.display(), head = %head_commit, base = %base_commit, "workspace prepared");
        Ok(WorkspacePrepareResult {
            vm: row.name.clone(),
            path: GUEST_REPO.to_string(),
            source: packed.top.display().to_string(),
            mode,
            head_commit,
            host_head: packed.head.clone(),
            base_commit,
            host_dirty: value("dirty").as_deref() == Some("1"),
            branch: packed.branch.clone(),
            files: packed.files,
            bytes: total,
            git_user_name,
            git_user_email,
            replaced: value("replaced").as_deref() == Some("1"),
        })
    }

    pub async fn workspace_export(
        self: &Arc<Self>,
        p: WorkspaceExportParams,
        ctx: CallContext,
    ) -> Result<WorkspaceExportResult, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let check_top = match &p.check_repo {
            Some(path) => Some(work_tree_top("check_repo", path).await?),
            None => None,
        };
        let stages = Arc::new(self.workspace_op("workspace.export", &row.name, EXPORT_STAGES, &ctx));
        let (engine, task_row, task_stages) = (self.clone(), row.clone(), stages.clone());
        let work = async move { engine.export_inner(&task_row, &conn, check_top.as_deref(), p, &task_stages).await };
        self.run_workspace_op(stages, row, &ctx, work).await
    }

    async fn export_inner(
        &self,
        row: &VmRow,
        conn: &GuestConn,
        check_top: Option<&Path>,
        p: WorkspaceExportParams,
        stages: &Stages,
    ) -> Result<WorkspaceExportResult, ApiError> {
        let cancel = stages.op.cancel.clone();
        let base_ref = p.base.clone().unwrap_or_else(|| BASE_REF.to_string());
        let patch_path = format!("{GUEST_STAGE}/export.patch");
        stages.enter("diff");
        let out = run_script(conn, &row.name, EXPORT_SCRIPT, &[GUEST_REPO, &base_ref, &patch_path], &cancel).await?;
        match out.status.code {
            Some(0) => {}
            Some(EXIT_NO_REPO) => {
                return Err(ApiError::precondition(format!("VM {} has no repository at {GUEST_REPO}", row.name))
                    .with_hint(format!("copy one in first: banger vm workspace prepare {} PATH", row.name)))
            }
            Some(EXIT_BAD_BASE) if p.base.is_none() => {
                return Err(ApiError::precondition(format!(
                    "the repository in VM {} has no {BASE_REF}: it was not made by workspace prepare",
                    row.name
                ))
                .with_hint("name the commit to diff against with base"))
            }
            Some(EXIT_BAD_BASE) => {
                return Err(ApiError::invalid(format!("base `{base_ref}` is not a commit in the guest repository"))
                    .with_hint("use the base_commit returned by workspace prepare, or omit base"))
            }
            _ => return Err(guest_failure(&row.name, "computing the patch", &out)),
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let base_commit = script_value(&stdout, "base").unwrap_or_default().to_string();
        let guest_head = script_value(&stdout, "head").unwrap_or_default().to_string();

        stages.enter("fetch");
        let files =
            read_guest_file(conn, &row.name, &format!("{patch_path}.files"), MAX_FILE_LIST, &cancel, |_, _| {}).await?;
        let ignored_raw =
            read_guest_file(conn, &row.name, &format!("{patch_path}.ignored"), MAX_FILE_LIST, &cancel, |_, _| {})
                .await?;
        let ignored_all: Vec<String> = ignored_raw
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let inline_limit = p.max_inline_bytes.unwrap_or(DEFAULT_INLINE_PATCH);
        // The whole patch is needed on the host for the check; otherwise only when it goes inline.
        let (_, size, _) = conn.read_file(&patch_path, 0, 0, &cancel).await.map_err(|e| guest_err(&row.name, e))?;
        let patch = if size <= inline_limit || check_top.is_some() {
            Some(
                read_guest_file(conn, &row.name, &patch_path, MAX_HOST_PATCH, &cancel, |done, total| {
                    stages.report("fetch", done as f64 / total.max(1) as f64)
                })
                .await?,
            )
        } else {
            None
        };
        let patch_sha256 = match &patch {
            Some(data) => hex::encode(sha2::Sha256::digest(data)),
            None => {
                let out = run_script(conn, &row.name, "sha256sum < \"$1\"", &[&patch_path], &cancel).await?;
                String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
            }
        };
        stages.enter("check");
        let check = match (check_top, &patch) {
            (Some(top), Some(data)) => Some(apply_check(top, data).await?),
            _ => None,
        };
        let (patch, patch_encoding) = match patch.filter(|d| d.len() as u64 <= inline_limit) {
            Some(data) => {
                // With no encoding asked for, bytes always encode (text if UTF-8, else base64).
                let (text, encoding) =
                    super::vm::encode_chunk(&data, None, "the patch").expect("no encoding requested");
                (Some(text), Some(encoding))
            }
            None => (None, None),
        };
        Ok(WorkspaceExportResult {
            vm: row.name.clone(),
            base_ref,
            base_commit,
            guest_head,
            files: parse_name_status(&files),
            ignored_count: ignored_all.len() as u64,
            ignored: ignored_all.into_iter().take(MAX_IGNORED_LISTED).collect(),
            patch_inline: patch.is_some(),
            patch,
            patch_encoding,
            patch_bytes: size,
            patch_sha256,
            patch_path,
            check,
        })
    }
}

fn repo_exists(vm: &str) -> ApiError {
    ApiError::new(ErrorCode::AlreadyExists, format!("VM {vm} already has a non-empty {GUEST_REPO}")).with_hint(format!(
        "export its changes first (banger vm workspace export {vm}), then prepare again with --force to replace it"
    ))
}

#[cfg(test)]
mod tests {
    //! The guest scripts run here against real repositories on the host (sh, git and tar as in the guest),
    //! so their quoting, clean-up and the patch they produce are checked without booting a VM.
    use super::*;
    use std::process::Command;

    fn sh(dir: &Path, script: &str) -> String {
        let out = Command::new("sh")
            .args(["-eu", "-c", script])
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run(script: &str, args: &[&str]) -> std::process::Output {
        Command::new("sh").args(["-c", script, "sh"]).args(args).current_dir("/").output().unwrap()
    }

    /// Every file under `dir` but .git, with its content.
    fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let out = sh(dir, "find . -path ./.git -prune -o -type f -print | sort");
        out.lines().map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap())).collect()
    }

    fn host_repo() -> tempfile::TempDir {
        let host = tempfile::tempdir().unwrap();
        sh(
            host.path(),
            "git init -q -b main . && git config user.name 'Host User' && git config user.email host@example.invalid
             printf 'one\\ntwo\\nthree\\n' > a.txt && printf 'gone\\n' > doomed.txt && mkdir -p 'dir with space'
             printf 'spaced\\n' > 'dir with space/file name.txt' && printf '\\000\\001\\377bin' > blob.bin
             printf 'keep\\n' > move-me.txt && printf 'target/\\n' > .gitignore
             git add -A && git commit -q -m first
             printf 'four\\n' >> a.txt && git commit -q -am second
             printf 'host edit\\n' >> 'dir with space/file name.txt'
             printf 'scratch\\n' > untracked.txt",
        );
        host
    }

    #[tokio::test]
    async fn prepare_then_export_round_trips_every_kind_of_change() {
        let host = host_repo();
        let guest = tempfile::tempdir().unwrap();
        let repo = guest.path().join("repo");
        let repo_s = repo.to_str().unwrap();
        let stage = tempfile::tempdir().unwrap();
        let top = work_tree_top("path", host.path().to_str().unwrap()).await.unwrap();
        let packed = pack(&top, WorkspaceMode::Tracked, stage.path()).await.unwrap();
        assert_eq!(packed.branch.as_deref(), Some("main"));
        let stage_s = stage.path().to_str().unwrap();
        let args =
            [repo_s, stage_s, &packed.head, "main", "tracked", "0", "Host User", "host@example.invalid", &packed.pack];
        let out = run(PREPARE_SCRIPT, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(script_value(&stdout, "head"), Some(packed.head.as_str()));
        assert_eq!(script_value(&stdout, "dirty"), Some("1"), "the host edit makes a snapshot base");
        assert!(!stage.path().exists(), "the script removes its uploads");
        assert_eq!(sh(&repo, "git config user.name"), "Host User\n");
        assert_eq!(sh(&repo, "git rev-parse HEAD"), format!("{}\n", packed.head));
        assert!(!repo.join("untracked.txt").exists(), "tracked mode copies no untracked file");
        let guest_file = std::fs::read_to_string(repo.join("dir with space/file name.txt")).unwrap();
        assert_eq!(guest_file, "spaced\nhost edit\n");

        // A second prepare without force refuses and leaves the repository alone.
        let out = run(PREPARE_SCRIPT, &args);
        assert_eq!(out.status.code(), Some(EXIT_REPO_EXISTS));
        assert!(repo.join("a.txt").exists());

        // The agent's work: a commit, uncommitted edits, untracked and binary files, a delete, a rename,
        // something staged, and an ignored build output.
        sh(
            &repo,
            "printf 'one\\nTWO\\nthree\\nfour\\n' > a.txt && git commit -q -am 'guest commit'
             printf 'more\\n' >> a.txt && printf 'new\\n' > 'new file.txt' && printf '\\377\\000\\002' > new.bin
             git rm -q doomed.txt && git mv move-me.txt moved.txt && printf 'x\\001' >> blob.bin
             mkdir -p target && echo built > target/out",
        );
        let index_before = std::fs::read(repo.join(".git/index")).unwrap();
        let patch = guest.path().join("stage/export.patch");
        let out = run(EXPORT_SCRIPT, &[repo_s, BASE_REF, patch.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(repo.join(".git/index")).unwrap(), index_before, "the agent's index is untouched");
        let files = parse_name_status(&std::fs::read(format!("{}.files", patch.display())).unwrap());
        let find = |p: &str| files.iter().find(|f| f.path == p).map(|f| f.status);
        assert_eq!(find("a.txt"), Some(ChangeKind::Modified));
        assert_eq!(find("new file.txt"), Some(ChangeKind::Added));
        assert_eq!(find("doomed.txt"), Some(ChangeKind::Deleted));
        assert_eq!(find("moved.txt"), Some(ChangeKind::Renamed));
        assert_eq!(find("blob.bin"), Some(ChangeKind::Modified));
        assert!(find("dir with space/file name.txt").is_none(), "the host's own edit is in the base");
        assert_eq!(std::fs::read(format!("{}.ignored", patch.display())).unwrap(), b"target/\0");

        let data = std::fs::read(&patch).unwrap();
        assert!(apply_check(&top, &data).await.unwrap().clean);
        sh(host.path(), &format!("rm untracked.txt && git apply '{}'", patch.display()));
        let mut guest_tree = tree(&repo);
        guest_tree.retain(|(f, _)| !f.starts_with("./target/"));
        assert_eq!(tree(host.path()), guest_tree);

        // Applied once, the same patch now conflicts, and the check says where.
        let check = apply_check(&top, &data).await.unwrap();
        assert!(!check.clean);
        assert!(check.conflicts.iter().any(|c| c.contains("a.txt") || c.contains("already exists")), "{check:?}");

        // With force the repository is replaced.
        let stage = tempfile::tempdir().unwrap();
        let packed = pack(&top, WorkspaceMode::Full, stage.path()).await.unwrap();
        let stage_s = stage.path().to_str().unwrap();
        let out = run(PREPARE_SCRIPT, &[repo_s, stage_s, &packed.head, "main", "full", "1", "", "", &packed.pack]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(script_value(&String::from_utf8_lossy(&out.stdout), "replaced"), Some("1"));
        assert!(!guest.path().join("repo.banger-replaced").exists());
    }

    #[tokio::test]
    async fn a_failed_prepare_puts_the_replaced_repository_back() {
        let guest = tempfile::tempdir().unwrap();
        let repo = guest.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("agent-work"), "precious").unwrap();
        let stage = guest.path().join("empty-stage");
        std::fs::create_dir_all(&stage).unwrap();
        let out = run(
            PREPARE_SCRIPT,
            &[repo.to_str().unwrap(), stage.to_str().unwrap(), "abc", "", "tracked", "1", "", "", "pack-x"],
        );
        assert!(!out.status.success(), "no pack: the prepare must fail");
        assert_eq!(std::fs::read_to_string(repo.join("agent-work")).unwrap(), "precious");
        assert!(!stage.exists());
    }

    #[tokio::test]
    async fn not_a_repository_is_said_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let e = work_tree_top("path", dir.path().to_str().unwrap()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("not inside a git work tree"), "{e:?}");
        let e = work_tree_top("path", "/no/such/dir").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        sh(dir.path(), "git init -q .");
        let stage = tempfile::tempdir().unwrap();
        let e = pack(dir.path(), WorkspaceMode::Tracked, stage.path()).await.unwrap_err();
        assert!(e.message.contains("no commits"), "{e:?}");
    }

    /// Every entry of a tar: (path, type, contents).
    fn tar_entries(path: &Path) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        use std::io::Read;
        let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = vec![];
                e.read_to_end(&mut data).unwrap();
                (e.path().unwrap().display().to_string(), e.header().entry_type(), data)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_symlinked_parent_never_leads_prepare_out_of_the_repository() {
        let host = host_repo();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "TOPSECRET").unwrap();
        sh(host.path(), "mkdir conf && echo tracked > conf/secret && git add conf && git commit -q -m conf");
        // What a guest's patch can do to a tracked directory.
        sh(host.path(), &format!("rm -rf conf && ln -s '{}' conf", outside.path().display()));
        let stage = tempfile::tempdir().unwrap();
        let packed = pack(host.path(), WorkspaceMode::Full, stage.path()).await.unwrap();
        let entries = tar_entries(&stage.path().join("tree.tar"));
        assert!(entries.iter().all(|(_, _, d)| !String::from_utf8_lossy(d).contains("TOPSECRET")), "{entries:?}");
        let conf = entries.iter().find(|(p, _, _)| p == "conf").expect("the symlink itself is copied");
        assert_eq!(conf.1, tar::EntryType::Symlink);
        let deleted = std::fs::read(stage.path().join("deleted")).unwrap();
        assert!(deleted.split(|b| *b == 0).any(|n| n == b"conf/secret"), "{:?}", String::from_utf8_lossy(&deleted));
        assert!(packed.files >= 1);

        // And the guest gets the symlink where its directory was.
        let guest = tempfile::tempdir().unwrap();
        let repo = guest.path().join("repo");
        let stage_s = stage.path().to_str().unwrap();
        let args = [repo.to_str().unwrap(), stage_s, &packed.head, "main", "full", "0", "", "", &packed.pack];
        let out = run(PREPARE_SCRIPT, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read_link(repo.join("conf")).unwrap(), outside.path());
    }

    #[tokio::test]
    async fn repository_filters_and_fsmonitor_never_run() {
        let host = host_repo();
        let marker = tempfile::tempdir().unwrap();
        let ran = marker.path().join("ran");
        sh(
            host.path(),
            &format!(
                "printf '* filter=x diff=x\\n' > .gitattributes && git add .gitattributes && git commit -q -m attrs
                 git config filter.x.clean 'touch {r}; cat' && git config filter.x.required true
                 git config core.fsmonitor 'touch {r}; false' && git config diff.x.textconv 'touch {r}; cat'
                 touch -d '2001-01-01' a.txt && printf 'changed\\n' >> a.txt",
                r = ran.display()
            ),
        );
        let stage = tempfile::tempdir().unwrap();
        let top = work_tree_top("path", host.path().to_str().unwrap()).await.unwrap();
        pack(&top, WorkspaceMode::Full, stage.path()).await.unwrap();
        apply_check(&top, b"").await.unwrap();
        assert!(!ran.exists(), "a program from the repository's config ran");
        // The same repository does run it for a plain git: the test would see it.
        sh(host.path(), "git diff --quiet HEAD -- a.txt || true");
        assert!(ran.exists(), "the marker program is a real one");
    }

    #[test]
    fn name_status_is_parsed_with_renames() {
        let raw = b"M\0a b.txt\0R100\0old\0new\0D\0gone\0A\0added\0";
        let files = parse_name_status(raw);
        assert_eq!(files.len(), 4);
        assert_eq!(files[1], ChangedFile { status: ChangeKind::Renamed, path: "new".into(), from: Some("old".into()) });
        assert_eq!(files[0].path, "a b.txt");
    }
}
