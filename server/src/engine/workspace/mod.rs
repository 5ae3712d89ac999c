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

mod guest;
mod host;

pub(crate) use host::*;

/// What an error about a host repository path offers in its place, for the caller to fill in.
pub(crate) const REPO_PLACEHOLDER: &str = "<absolute path of a git work tree on the daemon's host>";

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
pub(crate) const PREPARE_SCRIPT: &str = include_str!("prepare.sh");

/// Runs in the guest after a cancelled or failed prepare whose script could not clean up (it was killed):
/// `sh -c ROLLBACK_SCRIPT sh REPO STAGE WAS_EMPTY`. Puts a replaced repository back, or removes a new one
/// when REPO was empty before.
const ROLLBACK_SCRIPT: &str = include_str!("rollback.sh");

/// Runs in the guest: `sh -c EXPORT_SCRIPT sh REPO BASE OUT`. Writes the patch to OUT, the changed files
/// (`git diff --name-status -z`) to OUT.files and ignored untracked names to OUT.ignored, then prints
/// `base=`, `head=` lines.
pub(crate) const EXPORT_SCRIPT: &str = include_str!("export.sh");

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
                .with_hint("give a path on the daemon's host that the daemon can read (it runs as its own user)")
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
            .map_err(|e| {
                ApiError::internal(format!("handing {} to the repository's owner: {e}", dir.display()))
                    .with_hint("the repository must be on a filesystem that allows chown (not a FUSE or network mount)")
            })
    }
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
