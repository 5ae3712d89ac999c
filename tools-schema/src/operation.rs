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
}

/// Refers to one operation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    /// Operation id, as returned by the `*_begin` method.
    pub id: String,
}

/// Operations still running or finished in the last ten minutes.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OperationList {
    pub operations: Vec<OperationInfo>,
}
