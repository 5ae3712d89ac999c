//! VMs: what is shared by the operations on them (their records and views, resolving a name, batches, names and
//! MACs), with each concern in its own file: `create` (checks, allocation,
//! disks, pool hand-out), `boot` (cold or warm, waiting for the agent, undone by its rollback), `channel` (the
//! live guest connection and the one shared connect), `lifecycle` (start, stop, kill, restart, set, delete),
//! `exec` (commands and their spooled output), `files`, `inspect` (stats, ports, console logs) and
//! `reconcile` (the store made to agree with the host at daemon start).
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, BoxFuture, Shared};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::{Empty, VmmKind};
use tools_schema::guest::{ExecSpec, GuestRequest};
use tools_schema::operation::OperationInfo;
use tools_schema::vm::{
    parse_mode, BootInfo, BootMode, BootRequest, ContentEncoding, ExecStream, PortProtocol, VmBatchResult,
    VmCreateParams, VmExecOutputChunk, VmExecOutputParams, VmExecParams, VmExecResult, VmFileReadParams,
    VmFileReadResult, VmFileWriteParams, VmFileWriteResult, VmInfo, VmList, VmLogs, VmLogsParams, VmOutcome, VmPort,
    VmPorts, VmRef, VmRefs, VmSetParams, VmState, VmStats, EXEC_INLINE_DEFAULT, EXEC_INLINE_MAX, MAX_FILE_CHUNK,
};
use tools_schema::{ApiError, ErrorCode};

use sha2::Digest;

use super::operation::{Op, Rollback};
use super::warm::BootPlan;
use super::{new_id, now, CallContext, Engine};
use crate::guest::{Capture, GuestConn, GuestError};
use crate::store::{ImageRow, VmRow};
use crate::vmm::{self, BootSpec, VmPaths, VmmError};

mod boot;
mod channel;
mod create;
mod exec;
mod files;
mod inspect;
mod lifecycle;
mod reconcile;
mod state;

pub(crate) use channel::Guests;
pub(crate) use state::Vms;

use super::errors::{file_error, guest_error, vmm_error};

const ADJECTIVES: &[&str] =
    &["brisk", "calm", "eager", "fuzzy", "jolly", "lucky", "mellow", "nimble", "quiet", "rapid", "sunny", "witty"];
const NOUNS: &[&str] =
    &["otter", "falcon", "badger", "heron", "lynx", "marten", "panda", "raven", "tapir", "walrus", "yak", "zebra"];

fn generate_name(existing: &[VmRow]) -> String {
    loop {
        let a = ADJECTIVES[rand::random_range(0..ADJECTIVES.len())];
        let n = NOUNS[rand::random_range(0..NOUNS.len())];
        let suffix: u16 = rand::random_range(0..1000);
        let name = format!("{a}-{n}-{suffix}");
        if !existing.iter().any(|v| v.name == name) {
            return name;
        }
    }
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let b: [u8; 5] = rand::random();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

/// A random MAC no recorded VM has (called under the allocation lock; the store's unique index is the
/// backstop). Two guests on the bridge with one MAC would steal each other's frames.
fn unused_mac(existing: &[VmRow]) -> String {
    loop {
        let mac = random_mac();
        if mac != vmm::TEMPLATE_MAC && !existing.iter().any(|v| v.mac.as_deref() == Some(mac.as_str())) {
            return mac;
        }
    }
}

/// Bytes for a JSON result: as text when asked for or when they are UTF-8 (unless base64 is asked for),
/// otherwise base64. Asking for text of bytes that are not UTF-8 is the caller's error; `what` names them.
pub(crate) fn encode_chunk(
    data: &[u8],
    requested: Option<ContentEncoding>,
    what: &str,
) -> Result<(String, ContentEncoding), ApiError> {
    use base64::Engine as _;
    match (requested, std::str::from_utf8(data)) {
        (Some(ContentEncoding::Text) | None, Ok(text)) => Ok((text.to_string(), ContentEncoding::Text)),
        (Some(ContentEncoding::Text), Err(_)) => {
            Err(ApiError::invalid(format!("{what} is not UTF-8 text")).with_hint("read it with encoding: base64"))
        }
        _ => Ok((base64::engine::general_purpose::STANDARD.encode(data), ContentEncoding::Base64)),
    }
}

/// The end of a step that made things: kept on success, undone (newest first) on failure.
async fn settle<T>(rollback: Rollback, result: Result<T, ApiError>) -> Result<T, ApiError> {
    match result {
        Ok(v) => {
            rollback.disarm();
            Ok(v)
        }
        Err(e) => {
            rollback.undo().await;
            Err(e)
        }
    }
}

impl Engine {
    pub(crate) async fn vm_info(&self, row: &VmRow) -> VmInfo {
        let images = self.store.images().await.unwrap_or_default();
        self.vm_info_with(row, &images)
    }

    /// `vm_info` with the image list already loaded (one query for a whole `vm.list`).
    fn vm_info_with(&self, row: &VmRow, images: &[ImageRow]) -> VmInfo {
        let image = images
            .iter()
            .find(|i| i.id == row.image_id)
            .map(|i| i.name.clone())
            .unwrap_or_else(|| row.image_id.clone());
        VmInfo {
            id: row.id.clone(),
            name: row.name.clone(),
            state: row.state,
            image,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            vmm: row.vmm,
            pid: row.pid,
            created_at: row.created_at,
            started_at: row.started_at,
            ip: row.ip.map(|i| i.to_string()),
            dns_name: format!("{}.vm", row.name),
            nat: row.nat,
            disk_bytes: vmm::qcow2_virtual_size(&self.vm_paths(&row.id).root_disk()),
            work_disk_bytes: vmm::qcow2_virtual_size(&self.vm_paths(&row.id).work_disk()),
            last_error: row.last_error.clone(),
            boot: self.vms.last_boot(&row.id),
            containment: row.pid.and_then(|pid| self.vm_containment(&row.id, pid)),
        }
    }

    pub(crate) fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.cfg.vms_dir().join(id))
    }

    /// Finds a VM by exact id, exact name, or unique id prefix (4+ characters).
    pub(crate) async fn resolve_vm(&self, r: &str) -> Result<VmRow, ApiError> {
        if r.is_empty() {
            return Err(ApiError::invalid("VM reference is empty")
                .with_hint("name a VM by its name, id or a unique id prefix")
                .with_next("vm.list", serde_json::json!({}), "lists every VM"));
        }
        let vms = self.store.vms().await?;
        if let Some(v) = vms.iter().find(|v| v.id == r || v.name == r) {
            return Ok(v.clone());
        }
        let by_prefix: Vec<&VmRow> =
            if r.len() >= 4 { vms.iter().filter(|v| v.id.starts_with(r)).collect() } else { vec![] };
        match by_prefix.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ApiError::not_found(format!("no VM named `{r}`"))
                .with_hint("name a VM by its name, id or a unique id prefix")
                .with_next("vm.list", serde_json::json!({}), "lists every VM")),
            many => Err(ApiError::invalid(format!(
                "`{r}` matches several VMs: {}",
                many.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
            .with_hint("use the full name or a longer id prefix")),
        }
    }

    async fn reload(&self, id: &str) -> Result<VmRow, ApiError> {
        self.store.vm(id.to_string()).await?.ok_or_else(|| {
            ApiError::not_found(format!("VM {id} was deleted"))
                .with_hint("it was deleted while this call ran")
                .with_next("vm.list", serde_json::json!({}), "lists the VMs that exist")
        })
    }

    pub async fn vm_list(self: &Arc<Self>, _: Empty, _: CallContext) -> Result<VmList, ApiError> {
        let (rows, images) = (self.store.vms().await?, self.store.images().await?);
        Ok(VmList { vms: rows.iter().map(|r| self.vm_info_with(r, &images)).collect() })
    }

    pub async fn vm_show(self: &Arc<Self>, p: VmRef, _: CallContext) -> Result<VmInfo, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        Ok(self.vm_info(&row).await)
    }

    /// Stages of `vm.create`, in order.
    pub(crate) const CREATE_STAGES: &'static [&'static str] =
        &["allocate", "queue", "disks", "network", "boot", "agent", "ready"];

    /// Runs `op` for each distinct ref concurrently; results come back in the order the refs were given.
    async fn batch<F, Fut>(self: &Arc<Self>, refs: VmRefs, op: F) -> Result<VmBatchResult, ApiError>
    where
        F: Fn(Arc<Engine>, VmRow) -> Fut,
        Fut: std::future::Future<Output = Result<Option<VmInfo>, ApiError>>,
    {
        let names = refs.vm.into_names();
        if names.is_empty() {
            return Err(ApiError::invalid("name at least one VM").with_hint("pass vm: a VM name, or a list of names"));
        }
        let mut unique: Vec<String> = vec![];
        for r in names {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        let futures = unique.iter().map(|r| {
            let engine = self.clone();
            let op = &op;
            async move {
                let result = match engine.resolve_vm(r).await {
                    Ok(row) => op(engine.clone(), row).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(info) => VmOutcome { vm: r.clone(), info, error: None },
                    Err(e) => VmOutcome { vm: r.clone(), info: None, error: Some(e) },
                }
            }
        });
        let results = join_all(futures).await;
        let ok = results.iter().all(|r| r.error.is_none());
        Ok(VmBatchResult { results, ok })
    }

    fn is_alive(&self, row: &VmRow) -> bool {
        row.pid.is_some_and(|pid| crate::host::process_matches(pid, &vmm::process_marker(&row.id)))
    }
}
