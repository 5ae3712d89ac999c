//! The operation runner: every long operation (vm.create, image.build, workspace prepare/export) is an `Op`
//! with typed stages, a detail line, a cancellation token and an outcome, run in its own task by `run` (so a
//! caller that goes away cancels it instead of dropping it half-way) with a `Rollback` that undoes what it
//! made, in reverse order, unless it succeeded. Followers are woken by changes, never by a timer: blocking
//! calls through `follow` (which turns changes into MCP progress), others through `operation.wait`.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::Empty;
use tools_schema::image::ImageBuildResult;
use tools_schema::operation::{
    OperationInfo, OperationList, OperationRef, OperationState, OperationWaitParams, Stage, StageState,
};
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
            revision: 0,
        };
        Op {
            cancel: CancellationToken::new(),
            started: Instant::now(),
            inner: Mutex::new(OpInner { info, stage_started: None, finished: None }),
            changed: watch::channel(0).0,
        }
    }

    pub fn id(&self) -> String {
        self.inner.lock().info.id.clone()
    }

    pub fn set_target(&self, target: &str) {
        self.inner.lock().info.target = target.to_string();
    }

    /// Ends the running stage (done) and starts `name`.
    pub fn stage(&self, name: &str) {
        {
            let mut inner = self.inner.lock();
            close_running(&mut inner, StageState::Done);
            if let Some(s) = inner.info.stages.iter_mut().find(|s| s.name == name) {
                s.state = StageState::Running;
            }
            inner.stage_started = Some(Instant::now());
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The latest line of output of the running stage, shown to followers.
    pub fn detail(&self, line: &str) {
        self.inner.lock().info.detail = Some(line.to_string());
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn finish(&self, result: Result<impl Into<Outcome>, ApiError>) {
        {
            let mut inner = self.inner.lock();
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
        self.inner.lock().finished.is_some()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The operation now, with live durations for what is still running.
    pub fn snapshot(&self) -> OperationInfo {
        let inner = self.inner.lock();
        let mut info = inner.info.clone();
        info.revision = *self.changed.borrow();
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

    /// The operation as soon as its revision passes `after` (at once if it has, or it has finished), or as
    /// it is when `timeout` ends.
    pub async fn wait_change(&self, after: u64, timeout: Duration) -> OperationInfo {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            while *rx.borrow_and_update() <= after && !self.is_done() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.snapshot()
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

/// Ends the running stage, with one log line per stage: the daemon's log shows where an operation's time went.
fn close_running(inner: &mut OpInner, to: StageState) {
    let elapsed = inner.stage_started.map(|t| t.elapsed().as_millis() as u64);
    if let Some(s) = inner.info.stages.iter_mut().find(|s| s.state == StageState::Running) {
        s.state = to;
        s.duration_ms = elapsed;
        tracing::info!(op = %inner.info.id, kind = %inner.info.kind, target = %inner.info.target, stage = %s.name,
            state = ?to, ms = elapsed.unwrap_or(0), "stage");
    }
}

#[derive(Default)]
pub(crate) struct Ops {
    map: Mutex<HashMap<String, Arc<Op>>>,
}

impl Ops {
    pub fn start(&self, kind: &str, target: &str, stages: &[&str]) -> Arc<Op> {
        let op = Arc::new(Op::new(super::new_id(), kind, target, stages));
        let mut map = self.map.lock();
        map.retain(|_, o| o.inner.lock().finished.is_none_or(|t| t.elapsed() < KEEP_FINISHED));
        map.insert(op.id(), op.clone());
        op
    }

    pub fn forget(&self, id: &str) {
        self.map.lock().remove(id);
    }

    pub fn get(&self, id: &str) -> Result<Arc<Op>, ApiError> {
        self.map.lock().get(id).cloned().ok_or_else(|| {
            ApiError::not_found(format!("no operation `{id}`"))
                .with_hint("operations are kept for ten minutes after they finish")
                .with_next("operation.list", serde_json::json!({}), "lists the operations kept")
        })
    }

    pub fn list(&self) -> Vec<OperationInfo> {
        let map = self.map.lock();
        let mut ops: Vec<(Instant, OperationInfo)> = map.values().map(|o| (o.started, o.snapshot())).collect();
        ops.sort_by_key(|(t, _)| *t);
        ops.into_iter().map(|(_, i)| i).collect()
    }
}

impl super::Engine {
    pub async fn operation_status(
        self: &Arc<Self>,
        p: OperationRef,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        Ok(self.ops.get(&p.id)?.snapshot())
    }

    pub async fn operation_wait(
        self: &Arc<Self>,
        p: OperationWaitParams,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let op = self.ops.get(&p.id)?;
        let timeout = Duration::from_millis(p.timeout_ms.unwrap_or(DEFAULT_WAIT_MS));
        Ok(op.wait_change(p.after, timeout).await)
    }

    pub async fn operation_cancel(
        self: &Arc<Self>,
        p: OperationRef,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        let op = self.ops.get(&p.id)?;
        op.cancel.cancel();
        // Report the rolled-back outcome, not a half-way state.
        let _ = tokio::time::timeout(Duration::from_secs(60), op.wait()).await;
        Ok(op.snapshot())
    }

    pub async fn operation_list(self: &Arc<Self>, _: Empty, _: CallContext) -> Result<OperationList, ApiError> {
        Ok(OperationList { operations: self.ops.list() })
    }
}

/// `operation.wait` without a `timeout_ms`.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// Runs `work` as `op` in a task of its own, records its outcome (`outcome` of a success, or the error) and
/// logs one line with every stage's time. The task outlives its caller: a caller that goes away cancels
/// the operation's token and the work rolls back, it is never dropped half-way.
pub(crate) fn run<T, W>(
    op: &Arc<Op>,
    work: W,
    outcome: fn(&T) -> Outcome,
) -> tokio::task::JoinHandle<Result<T, ApiError>>
where
    T: Send + 'static,
    W: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let op = op.clone();
    tokio::spawn(async move {
        let result = work.await;
        op.finish(result.as_ref().map(outcome).map_err(Clone::clone));
        let snap = op.snapshot();
        let stages: Vec<String> =
            snap.stages.iter().map(|s| format!("{}={}ms", s.name, s.duration_ms.unwrap_or(0))).collect();
        tracing::info!(op = %snap.id, kind = %snap.kind, target = %snap.target, state = ?snap.state,
            elapsed_ms = snap.elapsed_ms, stages = %stages.join(" "), error = ?snap.error.as_ref().map(|e| &e.message),
            "operation finished");
        result
    })
}

/// Waits for a task `run` started on behalf of a blocking caller: the caller's cancel (or this future
/// dropped, when the caller disconnects) cancels the operation, whose task then rolls back and ends.
pub(crate) async fn join<T>(
    op: &Op,
    task: tokio::task::JoinHandle<Result<T, ApiError>>,
    ctx: &CallContext,
) -> Result<T, ApiError> {
    let cancel_on_drop = op.cancel.clone().drop_guard();
    let caller = ctx.cancel.clone();
    let token = op.cancel.clone();
    let result = tokio::select! {
        r = task => r,
        _ = async { caller.cancelled().await; token.cancel(); std::future::pending::<()>().await } => unreachable!(),
    };
    cancel_on_drop.disarm();
    result.unwrap_or_else(|e| {
        Err(ApiError::internal(format!("operation task failed: {e}")).with_hint(crate::engine::errors::hint::BUG))
    })
}

type Undo = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What an operation made so far, as the steps that undo it. On failure or cancel `undo` runs them newest
/// first; `disarm` keeps everything (success). A guard dropped while still armed (a panic, a task aborted)
/// runs its steps in a task of its own, so nothing made is ever left behind by an early return.
pub(crate) struct Rollback {
    what: String,
    steps: Vec<(&'static str, Undo)>,
}

impl Rollback {
    pub fn new(what: impl Into<String>) -> Rollback {
        Rollback { what: what.into(), steps: vec![] }
    }

    /// Records that something was made; `undo` removes it.
    pub fn push(&mut self, step: &'static str, undo: impl Future<Output = ()> + Send + 'static) {
        self.steps.push((step, Box::pin(undo)));
    }

    /// Success: everything made stays.
    pub fn disarm(mut self) {
        self.steps.clear();
    }

    /// Failure: removes everything made, newest first.
    pub async fn undo(mut self) {
        let steps = std::mem::take(&mut self.steps);
        undo_all(&self.what, steps).await;
    }

    /// The steps recorded so far, newest last (for tests).
    #[cfg(test)]
    fn names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|(n, _)| *n).collect()
    }
}

async fn undo_all(what: &str, steps: Vec<(&'static str, Undo)>) {
    for (step, undo) in steps.into_iter().rev() {
        tracing::debug!(what, step, "rolling back");
        undo.await;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        let steps = std::mem::take(&mut self.steps);
        if steps.is_empty() {
            return;
        }
        tracing::warn!(what = %self.what, "rolling back after an early exit");
        let what = self.what.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { undo_all(&what, steps).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<&'static str>>>, impl Fn(&'static str) -> Undo) {
        let log = Arc::new(Mutex::new(vec![]));
        let l = log.clone();
        (log, move |name| {
            let l = l.clone();
            Box::pin(async move { l.lock().push(name) })
        })
    }

    #[tokio::test]
    async fn undo_runs_newest_first_and_disarm_keeps_everything() {
        let (log, step) = recorder();
        let mut rb = Rollback::new("test");
        for name in ["record", "dir", "tap", "process"] {
            rb.push(name, step(name));
        }
        assert_eq!(rb.names(), ["record", "dir", "tap", "process"]);
        rb.undo().await;
        assert_eq!(*log.lock(), ["process", "tap", "dir", "record"]);

        let (log, step) = recorder();
        let mut rb = Rollback::new("test");
        rb.push("record", step("record"));
        rb.disarm();
        tokio::task::yield_now().await;
        assert!(log.lock().is_empty());
    }

    #[tokio::test]
    async fn a_guard_dropped_armed_still_undoes() {
        let (log, step) = recorder();
        {
            let mut rb = Rollback::new("test");
            rb.push("a", step("a"));
            rb.push("b", step("b"));
        }
        for _ in 0..100 {
            if log.lock().len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*log.lock(), ["b", "a"]);
    }

    #[tokio::test]
    async fn wait_change_answers_at_the_next_change_not_before() {
        let op = Arc::new(Op::new("x".into(), "test", "t", &["one", "two"]));
        let seen = op.snapshot().revision;
        // Nothing changed: the wait ends by its timeout.
        let t = Instant::now();
        assert_eq!(op.wait_change(seen, Duration::from_millis(50)).await.revision, seen);
        assert!(t.elapsed() >= Duration::from_millis(50));
        let waiter = {
            let op = op.clone();
            tokio::spawn(async move { op.wait_change(seen, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        op.stage("one");
        let info = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(info.revision > seen);
        assert_eq!(info.stages[0].state, StageState::Running);
        // A revision already passed answers at once.
        let t = Instant::now();
        op.wait_change(seen, Duration::from_secs(30)).await;
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
