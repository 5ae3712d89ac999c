//! Long-running operations: their stages, state and result, followed by `operation.status` and by the
//! blocking front (`vm.create`), which turns stage changes into progress notifications.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tools_schema::image::ImageBuildResult;
use tools_schema::operation::{OperationInfo, OperationState, Stage, StageState};
use tools_schema::vm::VmInfo;
use tools_schema::ApiError;

use super::CallContext;

/// Finished operations stay visible this long.
const KEEP_FINISHED: Duration = Duration::from_secs(600);

pub(crate) struct Op {
    pub cancel: CancellationToken,
    started: Instant,
    inner: Mutex<OpInner>,
    changed: watch::Sender<u64>,
}

struct OpInner {
    info: OperationInfo,
    stage_started: Option<Instant>,
    finished: Option<Instant>,
}

impl Op {
    fn new(id: String, kind: &str, target: &str, stages: &[&str]) -> Op {
        let info = OperationInfo {
            id,
            kind: kind.to_string(),
            target: target.to_string(),
            state: OperationState::Running,
            stages: stages
                .iter()
                .map(|s| Stage { name: s.to_string(), state: StageState::Pending, duration_ms: None })
                .collect(),
            elapsed_ms: 0,
            vm: None,
            image_build: None,
            workspace: None,
            detail: None,
            error: None,
        };
        Op {
            cancel: CancellationToken::new(),
            started: Instant::now(),
            inner: Mutex::new(OpInner { info, stage_started: None, finished: None }),
            changed: watch::channel(0).0,
        }
    }

    pub fn id(&self) -> String {
        self.inner.lock().unwrap().info.id.clone()
    }

    pub fn set_target(&self, target: &str) {
        self.inner.lock().unwrap().info.target = target.to_string();
    }

    /// Ends the running stage (done) and starts `name`.
    pub fn stage(&self, name: &str) {
        {
            let mut inner = self.inner.lock().unwrap();
            close_running(&mut inner, StageState::Done);
            if let Some(s) = inner.info.stages.iter_mut().find(|s| s.name == name) {
                s.state = StageState::Running;
            }
            inner.stage_started = Some(Instant::now());
        }
        tracing::debug!(op = %self.id(), stage = name, "stage");
        self.changed.send_modify(|v| *v += 1);
    }

    /// The latest line of output of the running stage, shown to followers.
    pub fn detail(&self, line: &str) {
        self.inner.lock().unwrap().info.detail = Some(line.to_string());
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn finish(&self, result: Result<impl Into<Outcome>, ApiError>) {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.info.detail = None;
            match result {
                Ok(outcome) => {
                    close_running(&mut inner, StageState::Done);
                    inner.info.state = OperationState::Succeeded;
                    match outcome.into() {
                        Outcome::Vm(vm) => inner.info.vm = Some(vm),
                        Outcome::ImageBuild(b) => inner.info.image_build = Some(b),
                        Outcome::Run(r) => {
                            let r = *r;
                            inner.info.vm = Some(r.vm);
                            inner.info.workspace = Some(r.workspace);
                        }
                    }
                }
                Err(e) => {
                    close_running(&mut inner, StageState::Failed);
                    inner.info.state = if e.code == tools_schema::ErrorCode::Cancelled {
                        OperationState::Cancelled
                    } else {
                        OperationState::Failed
                    };
                    inner.info.error = Some(e);
                }
            }
            inner.info.elapsed_ms = self.started.elapsed().as_millis() as u64;
            inner.finished = Some(Instant::now());
        }
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn is_done(&self) -> bool {
        self.inner.lock().unwrap().finished.is_some()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The operation now, with live durations for what is still running.
    pub fn snapshot(&self) -> OperationInfo {
        let inner = self.inner.lock().unwrap();
        let mut info = inner.info.clone();
        if inner.finished.is_none() {
            info.elapsed_ms = self.started.elapsed().as_millis() as u64;
            if let (Some(s), Some(t)) =
                (info.stages.iter_mut().find(|s| s.state == StageState::Running), inner.stage_started)
            {
                s.duration_ms = Some(t.elapsed().as_millis() as u64);
            }
        }
        info
    }

    /// Waits until the operation has finished.
    pub async fn wait(&self) {
        let mut rx = self.subscribe();
        while !self.is_done() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// What a successful operation produced.
pub(crate) enum Outcome {
    Vm(VmInfo),
    ImageBuild(ImageBuildResult),
    Run(Box<tools_schema::workspace::VmRunResult>),
}

impl From<tools_schema::workspace::VmRunResult> for Outcome {
    fn from(r: tools_schema::workspace::VmRunResult) -> Self {
        Outcome::Run(Box::new(r))
    }
}

impl From<VmInfo> for Outcome {
    fn from(vm: VmInfo) -> Self {
        Outcome::Vm(vm)
    }
}

impl From<ImageBuildResult> for Outcome {
    fn from(b: ImageBuildResult) -> Self {
        Outcome::ImageBuild(b)
    }
}

/// Waits for `op` on behalf of a blocking call (`vm.create`, `image.build`): reports its stages to the
/// caller's progress sink, cancels it when the caller cancels or goes away (this future dropped), and
/// returns its final state.
pub(crate) async fn follow(op: &Op, ctx: &CallContext) -> OperationInfo {
    let cancel_on_drop = op.cancel.clone().drop_guard();
    let mut changes = op.subscribe();
    loop {
        if let Some(progress) = &ctx.progress {
            let snap = op.snapshot();
            let done = snap.stages.iter().filter(|s| s.state == StageState::Done).count() as f64;
            let running = snap.stages.iter().find(|s| s.state == StageState::Running).map(|s| s.name.clone());
            let value = if running.is_some() { done + 0.5 } else { done };
            let message = match (running, &snap.detail) {
                (Some(stage), Some(detail)) => format!("{}: {stage}: {detail}", snap.target),
                (Some(stage), None) => format!("{}: {stage}", snap.target),
                (None, _) => format!("{}: {:?}", snap.target, snap.state).to_lowercase(),
            };
            progress.report(value, snap.stages.len() as f64, message);
        }
        if op.is_done() {
            break;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = ctx.cancel.cancelled(), if !op.cancel.is_cancelled() => op.cancel.cancel(),
        }
    }
    cancel_on_drop.disarm();
    op.snapshot()
}

fn close_running(inner: &mut OpInner, to: StageState) {
    let elapsed = inner.stage_started.map(|t| t.elapsed().as_millis() as u64);
    if let Some(s) = inner.info.stages.iter_mut().find(|s| s.state == StageState::Running) {
        s.state = to;
        s.duration_ms = elapsed;
    }
}

#[derive(Default)]
pub(crate) struct Ops {
    map: Mutex<HashMap<String, Arc<Op>>>,
}

impl Ops {
    pub fn start(&self, kind: &str, target: &str, stages: &[&str]) -> Arc<Op> {
        let op = Arc::new(Op::new(super::new_id(), kind, target, stages));
        let mut map = self.map.lock().unwrap();
        map.retain(|_, o| o.inner.lock().unwrap().finished.is_none_or(|t| t.elapsed() < KEEP_FINISHED));
        map.insert(op.id(), op.clone());
        op
    }

    pub fn forget(&self, id: &str) {
        self.map.lock().unwrap().remove(id);
    }

    pub fn get(&self, id: &str) -> Result<Arc<Op>, ApiError> {
        self.map.lock().unwrap().get(id).cloned().ok_or_else(|| {
            ApiError::not_found(format!("no operation `{id}`"))
                .with_hint("operations are kept for ten minutes after they finish; `banger operation list`")
        })
    }

    pub fn list(&self) -> Vec<OperationInfo> {
        let map = self.map.lock().unwrap();
        let mut ops: Vec<(Instant, OperationInfo)> = map.values().map(|o| (o.started, o.snapshot())).collect();
        ops.sort_by_key(|(t, _)| *t);
        ops.into_iter().map(|(_, i)| i).collect()
    }
}
