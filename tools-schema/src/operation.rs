//! Long-running operations: started with a `*_begin` method, followed with `operation.status`, stopped with
//! `operation.cancel`. Each reports its stages with timings.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::vm::VmInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
    /// Cancelled by a caller; everything the operation made was rolled back.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Running,
    Done,
    Failed,
}

/// One step of an operation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Stage {
    /// Stage name, e.g. `allocate`, `disks`, `network`, `boot`, `agent`, `ready` (vm.create) or `rootfs`,
    /// `customize`, `assemble`, `register` (image.build) or `create`, `sshd`, `prepare` (vm.run).
    pub name: String,
    pub state: StageState,
    /// How long the stage took (so far, while running), in milliseconds.
    pub duration_ms: Option<u64>,
}

/// A long-running operation and where it is.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OperationInfo {
    /// Operation id, for operation_status and operation_cancel.
    pub id: String,
    /// The method that started it, e.g. `vm.create`.
    pub kind: String,
    /// What it acts on, e.g. the VM name.
    pub target: String,
    pub state: OperationState,
    pub stages: Vec<Stage>,
    /// Milliseconds since the operation started (until it finished, once it has).
    pub elapsed_ms: u64,
    /// The VM, once a VM operation has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    /// The build, once an image build has succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_build: Option<crate::image::ImageBuildResult>,
    /// The prepared repository, once a `vm.run` has succeeded (its VM is `vm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<crate::workspace::WorkspacePrepareResult>,
    /// The latest line of output from the running stage (e.g. what a recipe is doing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// Counts the operation's changes (stages, detail, outcome): pass it to operation_wait as `after` to be
    /// answered at its next change.
    #[serde(default)]
    pub revision: u64,
}

/// Refers to one operation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    /// Operation id, as returned by the `*_begin` method.
    pub id: String,
}

/// Longest wait `operation.wait` accepts, in milliseconds.
pub const MAX_OPERATION_WAIT_MS: u64 = 60_000;

/// Waits for an operation to change.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationWaitParams {
    /// Operation id, as returned by the `*_begin` method.
    pub id: String,
    /// The `revision` the caller has seen: the answer comes as soon as the operation's is higher (at once
    /// when it already is, or when the operation has finished). Default 0.
    #[serde(default)]
    pub after: u64,
    /// Answer with the operation as it is after this long (1-60000 ms) even if it has not changed.
    /// Default 30000.
    #[serde(default)]
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: Option<u64>,
}

impl OperationWaitParams {
    pub fn validate(&self) -> Result<(), String> {
        match self.timeout_ms {
            Some(t) if t == 0 || t > MAX_OPERATION_WAIT_MS => {
                Err(format!("timeout_ms must be between 1 and {MAX_OPERATION_WAIT_MS}, got {t}"))
            }
            _ => Ok(()),
        }
    }
}

/// Operations still running or finished in the last ten minutes.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OperationList {
    pub operations: Vec<OperationInfo>,
}
