//! Long-running operations: their stages, state and result, followed by `operation.status` and by the
//! blocking front (`vm.create`), which turns stage changes into progress notifications.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tools_schema::operation::{OperationInfo, OperationState, Stage, StageState};
use tools_schema::vm::VmInfo;
use tools_schema::ApiError;

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

    pub fn finish(&self, result: Result<VmInfo, ApiError>) {
        {
            let mut inner = self.inner.lock().unwrap();
            match result {
                Ok(vm) => {
                    close_running(&mut inner, StageState::Done);
                    inner.info.state = OperationState::Succeeded;
                    inner.info.vm = Some(vm);
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
