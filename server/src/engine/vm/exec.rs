//! vm.exec and vm.exec_output: commands in the guest, with output beyond the inline cap spooled per VM within its budget.
use super::*;

/// Largest stdout or stderr `vm.exec` returns; more is cut and flagged.
/// Cut command outputs kept per VM for vm.exec_output; older ones are removed.
pub(super) const KEEP_EXEC_OUTPUTS: usize = 16;
pub(super) const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 600;

/// Removes one command's spool files; returns the bytes freed.
pub(super) async fn remove_spool(dir: &std::path::Path, id: &str) -> u64 {
    let mut freed = 0;
    for stream in [ExecStream::Stdout, ExecStream::Stderr] {
        let path = dir.join(format!("{id}.{}", stream.as_str()));
        let len = tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
        if tokio::fs::remove_file(&path).await.is_ok() {
            freed += len;
        }
    }
    freed
}

/// Returns freed spool bytes to a VM's budget.
pub(super) fn give_back(budget: &std::sync::atomic::AtomicU64, freed: u64) {
    budget.fetch_add(freed, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes in a folder's files (not recursive).
pub(super) async fn folder_bytes(dir: &std::path::Path) -> u64 {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else { return 0 };
    let mut total = 0;
    while let Ok(Some(e)) = rd.next_entry().await {
        total += e.metadata().await.map_or(0, |m| m.len());
    }
    total
}

/// Keeps the spools of the newest `keep` commands in `dir`; returns the bytes freed.
pub(super) async fn prune_spools(dir: &std::path::Path, keep: usize) -> u64 {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else { return 0 };
    let mut ids: std::collections::HashMap<String, std::time::SystemTime> = Default::default();
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((id, _)) = name.split_once('.') else { continue };
        let modified = e.metadata().await.and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        let t = ids.entry(id.to_string()).or_insert(modified);
        *t = (*t).max(modified);
    }
    let mut by_age: Vec<(std::time::SystemTime, String)> = ids.into_iter().map(|(id, t)| (t, id)).collect();
    by_age.sort();
    let excess = by_age.len().saturating_sub(keep);
    let mut freed = 0;
    for (_, id) in by_age.into_iter().take(excess) {
        freed += remove_spool(dir, &id).await;
    }
    freed
}

impl Engine {
    /// What the VM's exec spool may still take (`exec_spool_mib`, shared by all its commands): measured from the
    /// folder the first time, then kept by the captures that draw from it and the prunes that give back.
    /// When it is spent the oldest spools go first (beyond the newest one), then output is cut.
    pub(super) async fn spool_budget(&self, vm_id: &str, dir: &std::path::Path) -> Arc<std::sync::atomic::AtomicU64> {
        let cap = self.cfg.exec_spool_mib << 20;
        let known = self.vms.spool_budget(vm_id);
        let budget = match known {
            Some(b) => b,
            None => {
                let used = folder_bytes(dir).await;
                let fresh = Arc::new(std::sync::atomic::AtomicU64::new(cap.saturating_sub(used)));
                self.vms.keep_spool_budget(vm_id, fresh)
            }
        };
        // Less than half left: make room by dropping the oldest kept outputs (the newest stays).
        if budget.load(std::sync::atomic::Ordering::Relaxed) < cap / 2 {
            give_back(&budget, prune_spools(dir, 1).await);
        }
        budget
    }

    pub async fn vm_exec(self: &Arc<Self>, p: VmExecParams, ctx: CallContext) -> Result<VmExecResult, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let timeout_secs = p.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
        let spec = ExecSpec {
            argv: p.command.clone(),
            env: p.env.clone(),
            cwd: p.cwd.clone(),
            stdin: false,
            timeout_ms: Some(timeout_secs * 1000),
        };
        // The guest enforces the timeout; the host waits a little longer in case the guest cannot answer.
        let host_wait = Duration::from_secs(timeout_secs + 15);
        let inline = p.max_inline_bytes.unwrap_or(EXEC_INLINE_DEFAULT) as usize;
        let output_id = new_id();
        let spool_dir = self.vm_paths(&row.id).dir.join("exec-output");
        let spool = |stream: ExecStream| Some(spool_dir.join(format!("{output_id}.{}", stream.as_str())));
        let budget = self.spool_budget(&row.id, &spool_dir).await;
        let mut out = Capture::new(inline, spool(ExecStream::Stdout)).with_budget(budget.clone());
        let mut err = Capture::new(inline, spool(ExecStream::Stderr)).with_budget(budget.clone());
        let run = conn.exec_captured(spec, p.stdin.map(String::into_bytes), &mut out, &mut err, &ctx.cancel);
        let status = tokio::time::timeout(host_wait, run)
            .await
            .map_err(|_| guest_error(&row.name, GuestError::Timeout(host_wait)))
            .and_then(|r| r.map_err(|e| guest_error(&row.name, e)));
        let spooled = out.truncated() || err.truncated();
        let status = match status {
            Ok(st) => st,
            Err(e) => {
                give_back(&budget, remove_spool(&spool_dir, &output_id).await);
                return Err(e);
            }
        };
        if spooled {
            give_back(&budget, prune_spools(&spool_dir, KEEP_EXEC_OUTPUTS).await);
        }
        Ok(VmExecResult {
            exit_code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            stdout: String::from_utf8_lossy(&out.inline).into_owned(),
            stderr: String::from_utf8_lossy(&err.inline).into_owned(),
            stdout_truncated: out.truncated(),
            stderr_truncated: err.truncated(),
            stdout_bytes: out.total,
            stderr_bytes: err.total,
            output_id: spooled.then_some(output_id),
            duration_ms: status.duration_ms,
        })
    }

    pub async fn vm_exec_output(
        self: &Arc<Self>,
        p: VmExecOutputParams,
        _: CallContext,
    ) -> Result<VmExecOutputChunk, ApiError> {
        use std::io::{Read, Seek};
        let limit = p.limit.unwrap_or(EXEC_INLINE_DEFAULT);
        if limit == 0 || limit > EXEC_INLINE_MAX {
            return Err(ApiError::invalid(format!("limit must be between 1 and {EXEC_INLINE_MAX}, got {limit}"))
                .with_hint("ask for a smaller limit and page on with offset"));
        }
        if p.output_id.is_empty() || !p.output_id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::invalid(format!("output_id `{}` is not one vm_exec returned", p.output_id))
                .with_hint("pass the output_id that vm_exec returned for this VM"));
        }
        let row = self.resolve_vm(&p.vm).await?;
        let path =
            self.vm_paths(&row.id).dir.join("exec-output").join(format!("{}.{}", p.output_id, p.stream.as_str()));
        let offset = p.offset.unwrap_or(0);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(Vec<u8>, u64)>> {
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let total = f.metadata()?.len();
            f.seek(std::io::SeekFrom::Start(offset.min(total)))?;
            let mut data = Vec::new();
            f.take(limit).read_to_end(&mut data)?;
            Ok(Some((data, total)))
        })
        .await
        .map_err(|e| ApiError::internal(format!("output read task: {e}")).with_hint(crate::engine::errors::hint::BUG))?
        .map_err(|e| {
            ApiError::internal(format!("reading command output: {e}"))
                .with_hint("the spooled output may have been rotated out (16 per VM are kept); run the command again")
        })?;
        let (data, total) = match read {
            Some(v) => v,
            // A stream that fit inline has no spool; an unknown id has neither.
            None => {
                return Err(ApiError::not_found(format!(
                    "no kept {} for output `{}` of VM {}",
                    p.stream.as_str(),
                    p.output_id,
                    row.name
                ))
                .with_hint("only streams that were cut are kept, for the VM's last 16 such commands; run it again"))
            }
        };
        let end = offset.min(total) + data.len() as u64;
        let (content, encoding) = encode_chunk(&data, p.encoding, "this chunk (it may split a character)")?;
        Ok(VmExecOutputChunk {
            output_id: p.output_id,
            stream: p.stream,
            content,
            encoding,
            offset: offset.min(total),
            bytes: data.len() as u64,
            total_bytes: total,
            eof: end >= total,
            next_offset: (end < total).then_some(end),
        })
    }
}
