//! The workspace operations: prepare (check, pack, transfer, unpack with prepare.sh) and export (diff with export.sh, fetch, check), their guest scripts run through the agent, and the rollback when a prepare fails half way.
use super::*;

pub(super) fn guest_failure(vm: &str, what: &str, out: &ExecOutput) -> ApiError {
    // The guest's words: capped and escaped like any guest text that reaches a caller.
    let stderr = crate::guest::untrusted_text(String::from_utf8_lossy(&out.stderr).trim());
    if out.status.timed_out {
        return ApiError::new(ErrorCode::Timeout, format!("VM {vm}: {what} timed out"))
            .with_hint("retry once the guest is less busy")
            .with_next("vm.logs", serde_json::json!({"vm": vm}), "shows the guest console");
    }
    ApiError::internal(format!("VM {vm}: {what} failed ({:?}): {stderr}", out.status.code))
        .with_hint("the guest repository may have been changed by hand")
        .with_next(
            "vm.exec",
            serde_json::json!({"vm": vm, "command": ["git", "-C", GUEST_REPO, "status"]}),
            "shows the guest repository",
        )
}

pub(super) fn guest_err(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Cancelled => ApiError::new(ErrorCode::Cancelled, "cancelled by the caller")
            .with_hint(crate::engine::errors::hint::RUN_AGAIN),
        other => ApiError::new(
            ErrorCode::GuestUnreachable,
            format!("VM {vm}: {}", crate::engine::errors::error_chain(&other)),
        )
        .with_hint("the guest agent does not answer")
        .with_next("vm.logs", serde_json::json!({"vm": vm}), "shows the guest console"),
    }
}

/// Runs a workspace script in the guest with its arguments as positional parameters.
pub(super) async fn run_script(
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
    .map_err(|_| {
        ApiError::new(ErrorCode::Timeout, format!("VM {vm}: the guest did not answer"))
            .with_hint("the guest agent does not answer")
            .with_next("vm.logs", serde_json::json!({"vm": vm}), "shows the guest console")
            .with_next("vm.restart", serde_json::json!({"vm": vm}), "reboots the VM")
    })?
    .map_err(|e| guest_err(vm, e))?;
    if out.stdout_truncated {
        return Err(ApiError::internal(format!(
            "VM {vm}: a workspace script printed more than {SCRIPT_OUTPUT_LIMIT} bytes"
        ))
        .with_hint("the guest's workspace scripts were changed or replaced; recreate the VM from its image"));
    }
    Ok(out)
}

/// Reads a whole guest file in chunks of the file-read limit, at most `max_bytes` of it: the size the
/// guest reports is only a progress hint, never an allocation (a guest can claim any size, or grow the file
/// while it is read).
pub(super) async fn read_guest_file(
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
            .with_hint("the guest changed or replaced a file banger wrote; export again"));
        }
        if cancel.is_cancelled() {
            return Err(ApiError::new(ErrorCode::Cancelled, "cancelled by the caller")
                .with_hint(crate::engine::errors::hint::RUN_AGAIN));
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

pub(super) fn repo_exists(vm: &str, path: &str) -> ApiError {
    ApiError::new(ErrorCode::AlreadyExists, format!("VM {vm} already has a non-empty {GUEST_REPO}"))
        .with_hint("export its changes first if you want them; preparing again with force replaces them")
        .with_next("workspace.export", serde_json::json!({"vm": vm}), "exports the changes in it as a patch")
        .with_next(
            "workspace.prepare",
            serde_json::json!({"vm": vm, "path": path, "force": true}),
            "replaces it (what the guest changed there is lost)",
        )
}

impl Engine {
    /// The operation for a workspace call.
    pub(super) fn workspace_op(
        &self,
        kind: &str,
        vm: &str,
        names: &'static [&'static str],
        ctx: &CallContext,
    ) -> Stages {
        let op = self.ops.start(kind, vm, names);
        Stages { op, progress: ctx.progress.clone(), names, target: vm.to_string() }
    }

    /// Runs `work` through the operation runner, under the VM's lock: a caller that cancels or disconnects
    /// cancels it instead of dropping it half-way, and the work still rolls back and records the outcome.
    pub(super) async fn run_workspace_op<T: Send + 'static>(
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
        let task = crate::engine::operation::run(&stages.op, work, |(_, vm): &(T, VmInfo)| vm.clone().into());
        crate::engine::operation::join(&stages.op, task, ctx).await.map(|(result, _)| result)
    }

    pub async fn workspace_prepare(
        self: &Arc<Self>,
        p: WorkspacePrepareParams,
        ctx: CallContext,
    ) -> Result<WorkspacePrepareResult, ApiError> {
        p.validate().map_err(|e| {
            let fix = crate::engine::arguments::absolute_path_fix(
                crate::engine::arguments::as_arguments(&p),
                "path",
                &p.path,
            );
            crate::engine::arguments::invalid("workspace.prepare", e, fix)
        })?;
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let top = work_tree_top("path", &p.path).await.map_err(|e| {
            let args = crate::engine::arguments::as_arguments(&p);
            crate::engine::arguments::retry_with(e, "workspace.prepare", args, "path", super::REPO_PLACEHOLDER)
        })?;
        let stages = Arc::new(self.workspace_op("workspace.prepare", &row.name, PREPARE_STAGES, &ctx));
        let (engine, task_row, task_stages) = (self.clone(), row.clone(), stages.clone());
        let work = async move { engine.prepare_inner(&task_row, &conn, &top, p, &task_stages).await };
        self.run_workspace_op(stages, row, &ctx, work).await
    }

    pub(super) async fn prepare_inner(
        &self,
        row: &VmRow,
        conn: &GuestConn,
        top: &Path,
        p: WorkspacePrepareParams,
        stages: &Stages,
    ) -> Result<WorkspacePrepareResult, ApiError> {
        let cancel = stages.op.cancel.clone();
        let cancelled = || {
            ApiError::new(ErrorCode::Cancelled, "workspace prepare was cancelled; the guest is as it was")
                .with_hint("run the prepare again to retry")
        };
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
            return Err(repo_exists(&row.name, &p.path));
        }
        let host_path = p.path.clone();
        stages.enter("pack");
        let local = tempfile::Builder::new().prefix("banger-prepare-").tempdir().map_err(|e| {
            ApiError::internal(format!("temporary directory: {e}"))
                .with_hint("check free space and permissions of the host's temporary directory ($TMPDIR or /tmp)")
        })?;
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
        let stage = format!("{GUEST_STAGE}/prepare-{}", crate::engine::new_id());
        let uploads = ["history.pack", "history.idx", "tree.tar", "deleted", "changed"];
        let mut sizes = vec![];
        for name in uploads {
            sizes.push(std::fs::metadata(local.path().join(name)).map(|m| m.len()).unwrap_or(0));
        }
        let total: u64 = sizes.iter().sum();
        let mut sent = 0u64;
        let result = async {
            for name in uploads {
                let data = tokio::fs::read(local.path().join(name)).await.map_err(|e| {
                    ApiError::internal(format!("reading {name}: {e}")).with_hint(
                        "check free space of the host's temporary directory ($TMPDIR or /tmp), then prepare again",
                    )
                })?;
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
                return Err(repo_exists(&row.name, &host_path));
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
        let required = |k: &str| {
            value(k).ok_or_else(|| {
                ApiError::internal(format!("prepare printed no {k}: {}", crate::guest::untrusted_text(&stdout)))
                    .with_hint("the guest repository may have been changed by hand")
                    .with_next(
                        "vm.exec",
                        serde_json::json!({"vm": row.name, "command": ["git", "-C", GUEST_REPO, "log", "-1"]}),
                        "shows the guest repository",
                    )
            })
        };
        let (head_commit, base_commit) = (required("head")?, required("base")?);
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
        p.validate().map_err(|e| {
            let given = p.check_repo.as_deref().unwrap_or("/");
            let args = crate::engine::arguments::as_arguments(&p);
            let fix = crate::engine::arguments::absolute_path_fix(args, "check_repo", given);
            crate::engine::arguments::invalid("workspace.export", e, fix)
        })?;
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let check_top = match &p.check_repo {
            Some(path) => Some(work_tree_top("check_repo", path).await.map_err(|e| {
                let args = crate::engine::arguments::as_arguments(&p);
                crate::engine::arguments::retry_with(e, "workspace.export", args, "check_repo", super::REPO_PLACEHOLDER)
            })?),
            None => None,
        };
        let delete = p.delete;
        let stages = Arc::new(self.workspace_op("workspace.export", &row.name, EXPORT_STAGES, &ctx));
        let (engine, task_row, task_stages) = (self.clone(), row.clone(), stages.clone());
        let work = async move { engine.export_inner(&task_row, &conn, check_top.as_deref(), p, &task_stages).await };
        let mut result = self.run_workspace_op(stages, row.clone(), &ctx, work).await?;
        if delete {
            result.kept_because = keep_reason(&result);
            if result.kept_because.is_none() {
                let refs = tools_schema::vm::VmRefs { vm: tools_schema::vm::VmSelection::One(row.id.clone()) };
                let outcome = self.vm_delete(refs, ctx.clone()).await?;
                match outcome.results.into_iter().find_map(|o| o.error) {
                    None => result.deleted = true,
                    Some(e) => result.kept_because = Some(format!("deleting it failed: {}", e.message)),
                }
            }
        }
        Ok(result)
    }

    pub(super) async fn export_inner(
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
                    .with_hint("copy a host repository in first")
                    .with_next(
                        "workspace.prepare",
                        serde_json::json!({"vm": row.name, "path": "<absolute path of a git work tree on the host>"}),
                        "copies it in",
                    ))
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
                    crate::engine::vm::encode_chunk(&data, None, "the patch").expect("no encoding requested");
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
            deleted: false,
            kept_because: None,
        })
    }
}

/// Why an export's `delete` must not happen: the VM's work would not be safe on the host.
fn keep_reason(r: &WorkspaceExportResult) -> Option<String> {
    if !r.patch_inline {
        return Some(format!(
            "the patch ({} bytes) is larger than max_inline_bytes: read patch_path first, then delete the VM",
            r.patch_bytes
        ));
    }
    match &r.check {
        Some(c) if !c.clean => Some(format!(
            "the patch does not apply cleanly to {} ({}): the VM is kept to rework it",
            c.repo,
            c.conflicts.join(", ")
        )),
        _ => None,
    }
}
