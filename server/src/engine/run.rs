//! `vm.run`: the agent workflow's first step as one operation. Creates a VM (the `vm.create` operation,
//! followed), waits until its sshd answers and its host key is pinned, and prepares a host repository in it
//! (`workspace.prepare`). A failure or cancel at any stage deletes the VM it made: a run either leaves a VM
//! ready for work or nothing at all.
use std::sync::Arc;

use tools_schema::operation::OperationInfo;
use tools_schema::vm::{VmInfo, VmRefs};
use tools_schema::workspace::{VmRunParams, VmRunResult};
use tools_schema::{ApiError, ErrorCode};

use super::operation::Op;
use super::{CallContext, Engine, ProgressSink};

/// Stages of `vm.run`, in order. The create's and the prepare's own stages show as the detail.
const RUN_STAGES: &[&str] = &["create", "sshd", "prepare"];

/// Shows what an inner operation (the create, the prepare) reports as the run's detail line.
struct DetailSink(Arc<Op>);

impl ProgressSink for DetailSink {
    fn report(&self, _progress: f64, _total: f64, message: String) {
        self.0.detail(&message);
    }
}

impl Engine {
    /// Creates a VM, prepares the repository in it and waits for both, reporting stages as progress.
    pub async fn vm_run(self: &Arc<Self>, p: VmRunParams, ctx: CallContext) -> Result<VmRunResult, ApiError> {
        let info = self.vm_run_begin(p, ctx.clone()).await?;
        let op = self.ops.get(&info.id)?;
        let snap = super::operation::follow(&op, &ctx).await;
        match (snap.vm, snap.workspace, snap.error) {
            (Some(vm), Some(workspace), _) => Ok(VmRunResult { vm, workspace }),
            (_, _, Some(e)) => Err(e),
            _ => Err(ApiError::internal("vm.run ended without a result").with_hint(crate::engine::errors::hint::BUG)),
        }
    }

    /// Checks the request, starts the create (so argument and allocation errors come back at once), then runs
    /// the rest as an operation to follow or cancel.
    pub async fn vm_run_begin(self: &Arc<Self>, p: VmRunParams, _: CallContext) -> Result<OperationInfo, ApiError> {
        p.validate().map_err(|e| {
            use crate::engine::arguments as a;
            let args = a::as_arguments(&p);
            let fix = a::absolute_path_fix(args.clone(), "path", &p.path).or_else(|| {
                a::create_in_range(&p.create, |create| {
                    let mut args = args.clone();
                    args["create"] = create;
                    args
                })
            });
            a::invalid("vm.run", e, fix)
        })?;
        // A path that is not a repository is refused before anything is made.
        let top = super::workspace::work_tree_top("path", &p.path).await.map_err(|e| {
            let args = crate::engine::arguments::as_arguments(&p);
            crate::engine::arguments::retry_with(e, "vm.run", args, "path", super::workspace::REPO_PLACEHOLDER)
        })?;
        let mut create = p.create.clone();
        if create.name.is_none() {
            create.name = self.free_name_like(&top).await?;
        }
        let created = self.vm_create_begin(create, CallContext::default()).await?;
        let create_op = self.ops.get(&created.id)?;
        let op = self.ops.start("vm.run", &created.target, RUN_STAGES);
        op.stage("create");
        tracing::info!(vm = %created.target, op = %op.id(), create_op = %created.id, path = %top.display(), "vm run");
        let (engine, task_op) = (self.clone(), op.clone());
        tokio::spawn(async move {
            let result = engine.run_inner(p, &create_op, &task_op).await;
            if let Err(e) = &result {
                tracing::warn!(op = %task_op.id(), error = %e.message, "vm run failed; nothing kept");
            }
            task_op.finish(result);
        });
        Ok(op.snapshot())
    }

    async fn run_inner(
        self: &Arc<Self>,
        p: VmRunParams,
        create_op: &Op,
        op: &Arc<Op>,
    ) -> Result<VmRunResult, ApiError> {
        let cancel = op.cancel.clone();
        let inner = CallContext { cancel: cancel.clone(), progress: Some(Arc::new(DetailSink(op.clone()))) };
        // The create rolls itself back when it fails or is cancelled (follow cancels it with the run).
        let created = super::operation::follow(create_op, &inner).await;
        let vm = match (created.vm, created.error) {
            (Some(vm), _) => vm,
            (None, Some(e)) if cancel.is_cancelled() => return Err(cancelled_run(&e.message)),
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(
                    ApiError::internal("the create ended without a result").with_hint(crate::engine::errors::hint::BUG)
                )
            }
        };
        // From here on the run owns a VM: whatever ends the run early deletes it.
        let rest = async {
            op.stage("sshd");
            if let Some(ip) = vm.ip.as_deref().and_then(|ip| ip.parse().ok()) {
                // Not ready in time is no failure: the VM is good for everything but ssh, and ssh says why.
                self.wait_ssh_ready(&vm.name, ip, &cancel).await?;
            }
            op.stage("prepare");
            let workspace = self.workspace_prepare(p.prepare_params(vm.name.clone()), inner.clone()).await?;
            // The VM's state after the prepare (the workspace takes nothing from it, but it is the truth).
            let vm = match self.resolve_vm(&vm.id).await {
                Ok(row) => self.vm_info(&row).await,
                Err(_) => vm.clone(),
            };
            Ok::<_, ApiError>(VmRunResult { vm, workspace })
        };
        match rest.await {
            Ok(r) if !cancel.is_cancelled() => Ok(r),
            outcome => {
                let why = match outcome {
                    Err(e) if !cancel.is_cancelled() => e,
                    Err(e) => cancelled_run(&e.message),
                    Ok(_) => cancelled_run("cancelled after the prepare"),
                };
                Err(self.delete_run_vm(&vm, why).await)
            }
        }
    }

    /// Deletes the VM a failed or cancelled run made, and says so in the error.
    async fn delete_run_vm(self: &Arc<Self>, vm: &VmInfo, why: ApiError) -> ApiError {
        tracing::info!(vm = %vm.name, error = %why.message, "vm run ends early; deleting the VM it made");
        let deleted = self.vm_delete(VmRefs { vm: vm.id.clone().into() }, CallContext::default()).await;
        let failure = match deleted {
            Ok(r) if r.ok => None,
            Ok(r) => r.results.into_iter().find_map(|o| o.error).map(|e| e.message),
            Err(e) => Some(e.message),
        };
        let mut e = why;
        e.message = match failure {
            None => format!("{} (the VM {} made for it was deleted)", e.message, vm.name),
            Some(f) => {
                e.hint = Some("delete it yourself".into());
                e.next = vec![tools_schema::error::NextStep::new(
                    "vm.delete",
                    serde_json::json!({"vm": vm.name}),
                    "deletes the VM the run made",
                )];
                format!("{} (deleting the VM {} made for it failed too: {f})", e.message, vm.name)
            }
        };
        e
    }

    /// The repository's folder name as a VM name, when it is valid and not taken; otherwise none (the create
    /// generates one).
    async fn free_name_like(&self, top: &std::path::Path) -> Result<Option<String>, ApiError> {
        let Some(base) = top.file_name() else { return Ok(None) };
        let base = base.to_string_lossy().to_lowercase();
        let name: String = base.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let name: String = name.trim_matches('-').chars().take(40).collect();
        let name = name.trim_end_matches('-').to_string();
        if tools_schema::vm::validate_name("VM", &name).is_err() {
            return Ok(None);
        }
        let taken = self.store.vms().await?.iter().any(|v| v.name == name);
        Ok((!taken).then_some(name))
    }
}

fn cancelled_run(detail: &str) -> ApiError {
    ApiError::new(ErrorCode::Cancelled, format!("vm run was cancelled ({detail})"))
        .with_hint("whatever the run had made was deleted; run it again to retry")
}
