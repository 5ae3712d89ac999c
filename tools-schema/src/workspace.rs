//! Workspace operations: copy a host git repository into a guest (`workspace.prepare`) and bring back
//! everything the guest changed as one binary-safe patch (`workspace.export`).
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vm::ContentEncoding;

/// Where the repository lives in the guest.
pub const GUEST_REPO: &str = "/root/repo";
/// The guest ref that records the base commit of the last prepare; export diffs against it by default.
pub const BASE_REF: &str = "refs/banger/base";
/// Largest patch returned inside an export result; bigger patches are read from `patch_path`.
pub const MAX_INLINE_PATCH: u64 = 8 << 20;
/// Default inline limit: a patch up to this size comes back in the result itself.
pub const DEFAULT_INLINE_PATCH: u64 = 4 << 20;

/// What prepare copies from the host repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// The committed history and the working-tree copies of tracked files (uncommitted edits included).
    #[default]
    Tracked,
    /// Also untracked files that .gitignore does not exclude, and the contents of submodules.
    Full,
}

impl WorkspaceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceMode::Tracked => "tracked",
            WorkspaceMode::Full => "full",
        }
    }
}

/// Copy a host git repository into a running VM at /root/repo.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspacePrepareParams {
    /// VM name or id. It must be running.
    pub vm: String,
    /// Absolute path of a git work tree on the daemon's host (or any directory inside it).
    pub path: String,
    /// `tracked` (default) or `full` (also untracked, non-ignored files and submodules).
    #[serde(default)]
    pub mode: Option<WorkspaceMode>,
    /// Replace a non-empty /root/repo in the guest; without it prepare refuses.
    #[serde(default)]
    pub force: bool,
    /// Commit author name in the guest. Default: the host repository's `user.name`.
    #[serde(default)]
    pub git_user_name: Option<String>,
    /// Commit author email for the guest repository; defaults like `git_user_name`.
    #[serde(default)]
    pub git_user_email: Option<String>,
}

impl WorkspacePrepareParams {
    pub fn validate(&self) -> Result<(), String> {
        validate_host_path("path", &self.path)?;
        for (field, v) in [("git_user_name", &self.git_user_name), ("git_user_email", &self.git_user_email)] {
            if let Some(v) = v {
                if v.trim().is_empty() || v.contains(['\n', '\0', '<', '>']) {
                    return Err(format!("{field} must be one non-empty line without < or >, got {v:?}"));
                }
            }
        }
        Ok(())
    }
}

/// `vm.run`: create a VM and prepare a host git repository in it, as one operation. A failure or cancel at any
/// stage deletes the VM it made, so a failed run leaves nothing behind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRunParams {
    /// Absolute path of a git work tree on the daemon's host (or any directory inside it).
    pub path: String,
    /// `tracked` (default) or `full` (also untracked, non-ignored files and submodules).
    #[serde(default)]
    pub mode: Option<WorkspaceMode>,
    /// The VM, as vm_create takes it (see its parameters there). Unnamed, it gets the repository folder's name
    /// if that is free, else a generated one.
    #[serde(default)]
    #[schemars(schema_with = "create_params_undocumented")]
    pub create: crate::vm::VmCreateParams,
    /// Commit author name for the guest repository (see workspace_prepare).
    #[serde(default)]
    pub git_user_name: Option<String>,
    /// Commit author email for the guest repository (see workspace_prepare).
    #[serde(default)]
    pub git_user_email: Option<String>,
}

/// vm_run's `create`: vm_create's parameters without their descriptions, which vm_create's own schema carries
/// (an agent's context would otherwise pay for each of them twice). Types of their own (enums) are written in
/// place, undocumented too.
fn create_params_undocumented(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    fn undocumented(v: &mut serde_json::Value, defs: &serde_json::Map<String, serde_json::Value>) {
        if let Some(def) = v.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.rsplit('/').next()) {
            if let Some(def) = defs.get(def) {
                *v = def.clone();
            }
        }
        match v {
            serde_json::Value::Object(o) => {
                o.remove("description");
                o.values_mut().for_each(|v| undocumented(v, defs));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| undocumented(v, defs)),
            _ => {}
        }
    }
    let schema = <crate::vm::VmCreateParams as JsonSchema>::json_schema(generator);
    let defs = generator.definitions().clone();
    let mut value = schema.to_value();
    undocumented(&mut value, &defs);
    schemars::Schema::try_from(value).unwrap_or_default()
}

impl VmRunParams {
    /// Checks every field that can be checked without daemon state: the create's and the prepare's.
    pub fn validate(&self) -> Result<(), String> {
        self.create.validate()?;
        self.prepare_params(String::new()).validate()
    }

    /// The prepare step of the run, for the VM it made.
    pub fn prepare_params(&self, vm: String) -> WorkspacePrepareParams {
        WorkspacePrepareParams {
            vm,
            path: self.path.clone(),
            mode: self.mode,
            force: false,
            git_user_name: self.git_user_name.clone(),
            git_user_email: self.git_user_email.clone(),
        }
    }
}

/// What `vm.run` made: the running VM and the repository prepared in it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmRunResult {
    pub vm: crate::vm::VmInfo,
    pub workspace: WorkspacePrepareResult,
}

/// The repository as prepared in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WorkspacePrepareResult {
    /// VM name.
    pub vm: String,
    /// The repository in the guest: /root/repo.
    pub path: String,
    /// The host work tree that was copied (its top level).
    pub source: String,
    pub mode: WorkspaceMode,
    /// The guest repository's HEAD after prepare: the host's HEAD commit, same hash and history.
    pub head_commit: String,
    /// The host repository's HEAD (equal to `head_commit`).
    pub host_head: String,
    /// The commit export diffs against by default (recorded in the guest as refs/banger/base). It is
    /// `head_commit` when the copied tree equals HEAD; when the host had uncommitted edits (or, in full
    /// mode, untracked files) it is a snapshot commit on top of HEAD holding exactly the tree the guest
    /// started from, so an export brings back only what changed in the guest.
    pub base_commit: String,
    /// Whether the copied working tree differed from HEAD (uncommitted or untracked host files).
    pub host_dirty: bool,
    /// The branch checked out in the guest (the host's current branch), or none when the host HEAD was
    /// detached.
    pub branch: Option<String>,
    /// Files copied from the host working tree over the checkout: those that differ from HEAD (and, in full
    /// mode, untracked files and submodules' files); the checkout has the rest.
    pub files: u64,
    /// Bytes sent to the guest (history bundle plus working-tree archive).
    pub bytes: u64,
    /// The guest repository's commit identity.
    pub git_user_name: Option<String>,
    pub git_user_email: Option<String>,
    /// Whether an existing /root/repo was replaced (only with `force`).
    pub replaced: bool,
}

/// Bring back everything the guest changed in /root/repo as one patch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceExportParams {
    /// VM name or id. It must be running.
    pub vm: String,
    /// Commit to diff against. Default: the base workspace_prepare recorded (refs/banger/base), so commits
    /// made in the guest are in the patch.
    #[serde(default)]
    pub base: Option<String>,
    /// Check that the patch applies (`git apply --check`) to this host repository (absolute path).
    #[serde(default)]
    pub check_repo: Option<String>,
    /// Largest patch returned inline (0-8388608, default 4194304); a bigger one is never cut: read
    /// `patch_path` with vm_file_read.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8388608))]
    pub max_inline_bytes: Option<u64>,
    /// Then delete the VM, if the whole patch is in the result (and, with check_repo, applies); else
    /// `kept_because` says why not.
    #[serde(default)]
    pub delete: bool,
}

impl WorkspaceExportParams {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(base) = &self.base {
            validate_rev(base)?;
        }
        if let Some(p) = &self.check_repo {
            validate_host_path("check_repo", p)?;
        }
        if let Some(n) = self.max_inline_bytes {
            if n > MAX_INLINE_PATCH {
                return Err(format!("max_inline_bytes must be at most {MAX_INLINE_PATCH}, got {n}"));
            }
        }
        Ok(())
    }
}

/// How a file changed, as `git diff --name-status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    Renamed,
    Copied,
    /// File type changed (e.g. a file became a symlink).
    TypeChanged,
}

/// One changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChangedFile {
    pub status: ChangeKind,
    /// Path in the repository (the new path of a rename or copy).
    pub path: String,
    /// The old path of a rename or copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// Whether the patch applies to the host repository.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ApplyCheck {
    /// The host repository checked.
    pub repo: String,
    /// The host repository's HEAD when checked.
    pub host_head: String,
    /// True when `git apply --check` accepts the patch.
    pub clean: bool,
    /// What `git apply --check` reported (the conflicting files), empty when clean.
    pub conflicts: Vec<String>,
}

/// Everything the guest changed relative to the base.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WorkspaceExportResult {
    pub vm: String,
    /// The base as given (or refs/banger/base) and the commit it resolved to.
    pub base_ref: String,
    pub base_commit: String,
    /// The guest repository's HEAD (may be ahead of the base by the guest's own commits).
    pub guest_head: String,
    /// Changed files: committed in the guest, uncommitted, and untracked (not ignored).
    pub files: Vec<ChangedFile>,
    /// Untracked files the guest's .gitignore excludes: not in the patch, listed so nothing is dropped
    /// silently (at most 1000 names; `ignored_count` is the full number).
    pub ignored: Vec<String>,
    pub ignored_count: u64,
    /// The patch (`git diff --binary --full-index`), for `git apply` in the host repository. Absent when
    /// larger than the inline limit: read `patch_path` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// `text` (UTF-8) or `base64` (the patch holds text that is not UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_encoding: Option<ContentEncoding>,
    /// Size and sha256 of the whole patch.
    pub patch_bytes: u64,
    pub patch_sha256: String,
    /// Where the whole patch is kept in the guest until the next export (read it with vm_file_read).
    pub patch_path: String,
    /// Whether `patch` holds the whole patch.
    pub patch_inline: bool,
    /// Present when `check_repo` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<ApplyCheck>,
    /// Whether the VM was deleted (`delete`).
    #[serde(default)]
    pub deleted: bool,
    /// Why a `delete` was not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_because: Option<String>,
}

/// An absolute host path without NULs or newlines (git and tar take it as an argument).
fn validate_host_path(field: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{field} must be an absolute path, got `{p}`"));
    }
    if p.contains(['\0', '\n']) {
        return Err(format!("{field} must not contain NUL or newline characters"));
    }
    Ok(())
}

/// A git revision the guest script can pass safely: no option-like leading `-`, no whitespace or shell
/// metacharacters, and not one of git's range or pathspec forms.
pub fn validate_rev(rev: &str) -> Result<(), String> {
    let ok = !rev.is_empty()
        && rev.len() <= 256
        && !rev.starts_with('-')
        && !rev.contains("..")
        && rev.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-~^@{}".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "base must be a commit hash or ref name (letters, digits, / . _ - ~ ^ @ {{ }}, not starting with -), got `{rev}`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_checked() {
        for good in ["HEAD", "refs/banger/base", "HEAD~2", "main^{commit}", "0123abcd", "feature/x-1.2"] {
            assert!(validate_rev(good).is_ok(), "{good}");
        }
        for bad in ["", "-p", "a..b", "HEAD; rm -rf /", "a b", "$(x)", "x\ny"] {
            assert!(validate_rev(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_must_be_absolute() {
        let p = |path: &str| WorkspacePrepareParams { vm: "a".into(), path: path.into(), ..Default::default() };
        assert!(p("/home/u/repo").validate().is_ok());
        assert!(p("repo").validate().unwrap_err().contains("absolute"));
        let mut bad_name = p("/r");
        bad_name.git_user_name = Some("a\nb".into());
        assert!(bad_name.validate().unwrap_err().contains("git_user_name"));
        let e = WorkspaceExportParams {
            vm: "a".into(),
            max_inline_bytes: Some(MAX_INLINE_PATCH + 1),
            ..Default::default()
        };
        assert!(e.validate().unwrap_err().contains("max_inline_bytes"));
    }
}
