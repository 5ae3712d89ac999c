//! VM lifecycle: create, start, stop, restart, kill, delete, list, show, exec, logs; and reconcile at
//! daemon start.
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

/// Largest stdout or stderr `vm.exec` returns; more is cut and flagged.
/// Cut command outputs kept per VM for vm.exec_output; older ones are removed.
const KEEP_EXEC_OUTPUTS: usize = 16;
/// How long callers wait for the one connect to a running VM's channel (retried within it).
const GUEST_CONNECT_WAIT: Duration = Duration::from_secs(20);

/// A guest connect in progress, which every caller waiting for the VM's connection awaits.
pub(crate) type PendingConnect = Shared<BoxFuture<'static, Result<Arc<GuestConn>, ApiError>>>;
const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 600;

pub(crate) fn vmm_error(e: VmmError) -> ApiError {
    match e {
        VmmError::MissingBinary { .. } => ApiError::new(ErrorCode::HostUnsupported, e.to_string())
            .with_hint("run scripts/setup-host.sh, then `banger doctor`"),
        VmmError::Launch { .. } => {
            ApiError::internal(e.to_string()).with_hint("`banger doctor` checks the host set-up")
        }
        VmmError::Io { .. } => ApiError::internal(format!(
            "{e}: {}",
            std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
        )),
        // Their messages carry the VMM's own answer already.
        VmmError::Qmp { .. } | VmmError::Firecracker { .. } | VmmError::Guest(_) => {
            ApiError::internal(e.to_string()).with_hint("`banger doctor` checks the host set-up")
        }
    }
}

/// An error and its causes, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// File errors from the agent: a missing file is the caller's `not_found`, a bad path `invalid_argument`.
fn file_error(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Agent(m) if m.contains("No such file") => ApiError::not_found(m),
        GuestError::Agent(m) => ApiError::invalid(m),
        other => guest_error(vm, other),
    }
}

pub(crate) fn guest_error(vm: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Cancelled => ApiError::new(ErrorCode::Cancelled, "cancelled by the caller"),
        GuestError::Timeout(_) => ApiError::new(ErrorCode::Timeout, format!("VM {vm}: {e}"))
            .with_hint(format!("`banger vm logs {vm}` shows the guest console")),
        GuestError::Agent(ref m) if m.starts_with("cannot run") => ApiError::invalid(m.clone()),
        other => ApiError::new(ErrorCode::GuestUnreachable, format!("VM {vm}: {}", error_chain(&other)))
            .with_hint(format!("`banger vm logs {vm}` shows the guest console; `banger vm restart {vm}` reboots it")),
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
            boot: self.boots.lock().get(&row.id).cloned(),
        }
    }

    pub(crate) fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.cfg.vms_dir().join(id))
    }

    /// Finds a VM by exact id, exact name, or unique id prefix (4+ characters).
    pub(crate) async fn resolve_vm(&self, r: &str) -> Result<VmRow, ApiError> {
        if r.is_empty() {
            return Err(ApiError::invalid("VM reference is empty"));
        }
        let vms = self.store.vms().await?;
        if let Some(v) = vms.iter().find(|v| v.id == r || v.name == r) {
            return Ok(v.clone());
        }
        let by_prefix: Vec<&VmRow> =
            if r.len() >= 4 { vms.iter().filter(|v| v.id.starts_with(r)).collect() } else { vec![] };
        match by_prefix.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ApiError::not_found(format!("no VM named `{r}`")).with_hint("`banger vm list` shows every VM")),
            many => Err(ApiError::invalid(format!(
                "`{r}` matches several VMs: {}",
                many.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
            .with_hint("use the full name or a longer id prefix")),
        }
    }

    async fn reload(&self, id: &str) -> Result<VmRow, ApiError> {
        self.store.vm(id.to_string()).await?.ok_or_else(|| ApiError::not_found(format!("VM {id} was deleted")))
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

    /// Creates a VM and waits until it is ready, reporting stages as progress.
    pub async fn vm_create(self: &Arc<Self>, p: VmCreateParams, ctx: CallContext) -> Result<VmInfo, ApiError> {
        let info = self.vm_create_begin(p, ctx.clone()).await?;
        let op = self.ops.get(&info.id)?;
        let snap = super::operation::follow(&op, &ctx).await;
        match (snap.vm, snap.error) {
            (Some(vm), _) => Ok(vm),
            (None, Some(e)) => Err(e),
            (None, None) => Err(ApiError::internal("create ended without a result")),
        }
    }

    /// Validates, allocates and records the VM, then boots it in the background. Argument and allocation
    /// errors come back at once; everything after is reported through the operation.
    pub async fn vm_create_begin(
        self: &Arc<Self>,
        p: VmCreateParams,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
        let op = self.ops.start("vm.create", p.name.as_deref().unwrap_or(""), Self::CREATE_STAGES);
        op.stage("allocate");
        let cold = p.boot == Some(BootRequest::Cold);
        let allocated = self.allocate_vm(p).await;
        let (row, image, pooled) = match allocated {
            Ok(v) => v,
            Err(e) => {
                self.ops.forget(&op.id());
                return Err(e);
            }
        };
        op.set_target(&row.name);
        tracing::info!(vm = %row.name, id = %row.id, image = %image.name, op = %op.id(), "creating VM");
        let (engine, task_op) = (self.clone(), op.clone());
        let work = async move {
            let lock = engine.vm_lock(&row.id);
            let _held = lock.lock_owned().await;
            engine.clone().create_inner(row.clone(), image, &task_op, cold, pooled).await?;
            Ok(engine.vm_info(&engine.reload(&row.id).await?).await)
        };
        super::operation::run(&op, work, |vm: &VmInfo| vm.clone().into());
        Ok(op.snapshot())
    }

    /// A VMM that needs hardware KVM (Firecracker: on paravirtual KVM an ordinary guest kernel dies mid-boot)
    /// needs it, its binary, and an ELF kernel in the image if it boots one. Said before anything is made.
    fn check_driver(&self, driver: &vmm::Driver, image: &ImageRow) -> Result<(), ApiError> {
        use tools_schema::daemon::Acceleration;
        if !driver.needs_hardware_kvm() {
            return Ok(());
        }
        if self.vmm().acceleration != Acceleration::HardwareKvm && !self.cfg.allow_firecracker_without_hardware_kvm {
            return Err(ApiError::new(
                ErrorCode::HostUnsupported,
                format!(
                    "Firecracker needs hardware KVM; this host has {:?}: {}",
                    self.vmm().acceleration,
                    self.vmm().reason
                ),
            )
            .with_hint("use --vmm qemu (or leave --vmm out): QEMU runs guests on this host"));
        }
        if driver.find_binary().is_none() {
            return Err(vmm_error(VmmError::MissingBinary { binary: driver.binary() }));
        }
        if driver.needs_elf_kernel() && image.kernel_elf.is_none() {
            return Err(ApiError::precondition(format!(
                "image {} has no ELF kernel, which Firecracker boots",
                image.name
            ))
            .with_hint("register the image again with --kernel-elf (scripts/quickstart.sh does)"));
        }
        Ok(())
    }

    /// Checks the request against daemon state, picks name and address, and records the VM as starting.
    /// A VM restored earlier and waiting in the warm pool is taken when image and shape match; its id
    /// becomes the new VM's (its directory and VMM marker already carry it).
    async fn allocate_vm(
        &self,
        p: VmCreateParams,
    ) -> Result<(VmRow, ImageRow, Option<super::warm::PoolEntry>), ApiError> {
        let image = self.resolve_image(p.image.as_deref()).await?;
        let vmm = p.vmm.unwrap_or(self.vmm().vmm);
        self.check_driver(&self.driver(vmm), &image)?;
        let (vcpus, memory_mib) =
            (p.vcpus.unwrap_or(self.cfg.default_vcpus), p.memory_mib.unwrap_or(self.cfg.default_memory_mib));
        // Name, address, MAC, pool entry and memory promise are taken under one lock: what the checks saw
        // is still true when the record is written.
        let _alloc = self.alloc_lock.lock().await;
        // Pooled VMs run on the host's VMM.
        let pooled = (vmm == self.vmm().vmm && p.boot.unwrap_or_default() == BootRequest::Auto)
            .then(|| self.take_pooled(&image.id, vcpus, memory_mib))
            .flatten();
        let allocated =
            self.allocate_row(p, &image, vmm, vcpus, memory_mib, pooled.as_ref().map(|e| e.id.clone())).await;
        match allocated {
            Ok(row) => Ok((row, image, pooled)),
            Err(e) => {
                if let Some(entry) = pooled {
                    self.warm.pool.lock().push(entry);
                }
                Err(e)
            }
        }
    }

    /// Picks name, address and MAC, admits the VM's memory and records it as starting. The caller holds
    /// `alloc_lock`; `id` is a pooled VM's, whose memory is already promised.
    async fn allocate_row(
        &self,
        p: VmCreateParams,
        image: &ImageRow,
        vmm: VmmKind,
        vcpus: u32,
        memory_mib: u32,
        id: Option<String>,
    ) -> Result<VmRow, ApiError> {
        let existing = self.store.vms().await?;
        let name = match p.name {
            Some(n) => {
                if existing.iter().any(|v| v.name == n) {
                    return Err(ApiError::new(ErrorCode::AlreadyExists, format!("a VM named `{n}` already exists"))
                        .with_hint(format!("pick another name, or `banger vm delete {n}` first")));
                }
                n
            }
            None => generate_name(&existing),
        };
        // The pooled VM's promise moved from the pool to this record; anything else adds its memory.
        let adds = if id.is_some() { 0 } else { memory_mib as u64 };
        self.admit_memory(&format!("VM {name}"), adds, &existing)?;
        let ip = match self.network() {
            Some(net) => {
                let used = existing.iter().filter_map(|v| v.ip).collect();
                Some(net.allocate_ip(&used).map_err(|e| {
                    ApiError::new(ErrorCode::ResourceExhausted, e.to_string())
                        .with_hint("delete VMs you no longer need, or use a larger network.subnet")
                })?)
            }
            None => None,
        };
        let row = VmRow {
            id: id.unwrap_or_else(new_id),
            name,
            image_id: image.id.clone(),
            vcpus,
            memory_mib,
            vmm,
            state: VmState::Starting,
            pid: None,
            created_at: now(),
            started_at: None,
            last_error: None,
            ip,
            mac: ip.map(|_| unused_mac(&existing)),
            tap: None,
            nat: p.nat.unwrap_or(false),
        };
        self.store
            .insert_vm(row.clone())
            .await
            .map_err(|e| ApiError::new(ErrorCode::AlreadyExists, format!("cannot record VM `{}`: {e}", row.name)))?;
        Ok(row)
    }

    /// Everything of a create after its record: queue, disks, boot. Whatever it made is undone, newest
    /// first, when it fails or is cancelled (`Rollback`); `boot` undoes its own part (VMM, network) first.
    async fn create_inner(
        self: Arc<Self>,
        row: VmRow,
        image: ImageRow,
        op: &Op,
        cold: bool,
        pooled: Option<super::warm::PoolEntry>,
    ) -> Result<(), ApiError> {
        let paths = self.vm_paths(&row.id);
        let cancel = op.cancel.clone();
        let cancelled =
            || ApiError::new(ErrorCode::Cancelled, format!("creating VM {} was cancelled; nothing was kept", row.name));
        let from_pool = pooled.is_some();
        let mut rollback = Rollback::new(format!("creating VM {}", row.name));
        let (engine, id) = (self.clone(), row.id.clone());
        rollback.push("record", async move {
            let _ = engine.store.delete_vm(id).await;
        });
        if from_pool {
            // The pool lent a VM, ended by the rollback or kept: either way it refills.
            let engine = self.clone();
            rollback.push("pool refill", async move { engine.refill_pool_later() });
        }
        let result = async {
            if let Some(entry) = pooled {
                let dir = paths.dir.clone();
                rollback.push("directory", async move {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                });
                return self.adopt_pooled(&row, entry, op).await;
            }
            // Boots beyond what may run at once wait their turn, holding only the record.
            op.stage("queue");
            let _slot = self
                .slots
                .acquire(&cancel, |ahead| op.detail(&super::admission::waiting_message(ahead)))
                .await
                .ok_or_else(cancelled)?;
            op.stage("disks");
            create_vm_dir(&paths.dir).await?;
            let dir = paths.dir.clone();
            rollback.push("directory", async move {
                let _ = tokio::fs::remove_dir_all(&dir).await;
            });
            let mut plan = self.boot_plan(&row, &image, cold);
            if let BootPlan::Warm(t) = &plan {
                if let Err(e) = self.clone_disks(t, &paths).await {
                    plan = BootPlan::Cold { reason: Some(format!("cannot make the clone's disks: {}", e.message)) };
                }
            }
            if let BootPlan::Cold { .. } = plan {
                self.make_disks(&row, &image, &paths).await?;
            }
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            self.boot(&row, &image, &cancel, Some(op), plan).await
        }
        .await;
        let result = match result {
            Err(e) if cancel.is_cancelled() && e.code != ErrorCode::Cancelled => Err(cancelled()),
            Err(e) if e.code == ErrorCode::Cancelled => Err(cancelled()),
            other => other,
        };
        let boot = match result {
            Ok(boot) => boot,
            Err(e) => {
                tracing::warn!(vm = %row.name, error = %e.message, "create failed; rolling back");
                rollback.undo().await;
                return Err(e);
            }
        };
        rollback.disarm();
        if boot.mode == BootMode::Cold
            && !cold
            && matches!(self.find_template(&image, row.vmm, row.vcpus, row.memory_mib),
                Err(why) if !why.starts_with(super::warm::TEMPLATE_FAILED))
        {
            self.build_template_later(image.clone(), row.vmm, row.vcpus, row.memory_mib);
        }
        if from_pool {
            self.refill_pool_later();
        }
        Ok(())
    }

    /// A new VM's disks over the image's files, in its root layout (`vmm::RootLayout`): qcow2 overlays (QEMU's
    /// default), or an overlay disk and a sparse copy of the work seed (Firecracker, which takes raw disks only,
    /// and QEMU with `qemu_root_layout = "overlay"`). Replaces any the VM already has.
    async fn make_disks(&self, row: &VmRow, image: &ImageRow, paths: &VmPaths) -> Result<(), ApiError> {
        for d in [paths.root_disk(), paths.work_disk(), paths.overlay_disk(), paths.work_disk_raw()] {
            let _ = std::fs::remove_file(d);
        }
        let (base, seed) = (std::path::Path::new(&image.rootfs), std::path::Path::new(&image.work_seed));
        if self.driver(row.vmm).cold_layout() == vmm::RootLayout::Overlay {
            self.make_raw_disks(image, paths).await?;
        } else {
            let root_disk = paths.root_disk();
            let root = vmm::create_overlay_disk(&self.cfg, base, "raw", &root_disk);
            let work = async {
                if image.work_seed.is_empty() {
                    Ok(())
                } else {
                    vmm::create_overlay_disk(&self.cfg, seed, "raw", &paths.work_disk()).await
                }
            };
            let (a, b) = tokio::join!(root, work);
            a.and(b).map_err(vmm_error)?;
        }
        Ok(())
    }

    /// Firecracker takes raw disks only: writes go to an overlay disk, /root to a sparse copy of the seed.
    pub(crate) async fn make_raw_disks(&self, image: &ImageRow, paths: &VmPaths) -> Result<(), ApiError> {
        vmm::create_ext4_disk(&self.cfg, &paths.overlay_disk(), "banger-overlay", 4 << 30).await.map_err(vmm_error)?;
        if !image.work_seed.is_empty() {
            copy_writable(std::path::Path::new(&image.work_seed), &paths.work_disk_raw()).await?;
        }
        Ok(())
    }

    /// Hands a pooled VM (restored earlier, waiting) to a new record: its TAP, then its own identity.
    async fn adopt_pooled(
        self: &Arc<Self>,
        row: &VmRow,
        entry: super::warm::PoolEntry,
        op: &Op,
    ) -> Result<BootInfo, ApiError> {
        let started = std::time::Instant::now();
        let mut rollback = Rollback::new(format!("VM {}", row.name));
        self.undo_vmm(&mut rollback, row, entry.pid);
        op.detail("taking a restored VM from the warm pool");
        op.stage("network");
        let adopted = async {
            if let Some(tap) = &entry.tap {
                self.undo_net(&mut rollback, row);
                self.store.set_vm_tap(row.id.clone(), Some(tap.clone())).await?;
                // Its MAC changes now, with its identity: the TAP carries only the new one from the start.
                self.guard_tap(row, tap).await?;
            }
            op.stage("boot");
            self.store.set_vm_state(row.id.clone(), VmState::Starting, Some(entry.pid), None, None).await?;
            op.stage("agent");
            self.reidentify(row, &entry.conn).await?;
            let boot = BootInfo { mode: BootMode::Pool, cold_reason: None, ms: started.elapsed().as_millis() as u64 };
            self.finish_boot(row, entry.pid, entry.conn.clone(), Some(op), boot).await
        }
        .await;
        settle(rollback, adopted).await
    }

    /// Undoing a boot's VMM: the guest connection closed, the process (and its helpers) ended.
    fn undo_vmm(self: &Arc<Self>, rollback: &mut Rollback, row: &VmRow, pid: u32) {
        let (engine, id) = (self.clone(), row.id.clone());
        rollback.push("vmm", async move {
            engine.drop_guest(&id);
            vmm::stop_vm_processes(&engine.vm_paths(&id).dir, &id, Some(pid)).await;
        });
    }

    /// Undoing a boot's network: DNS name, NAT, the TAP's filter, the TAP back to the pool.
    fn undo_net(self: &Arc<Self>, rollback: &mut Rollback, row: &VmRow) {
        let (engine, row) = (self.clone(), row.clone());
        rollback.push("network", async move { engine.release_net(&row).await });
    }

    /// Brings the VM up, warm from a template when the plan says so (falling back to a cold boot, with
    /// the reason, if the restore fails), and waits for the guest agent. On failure everything it made
    /// (network, VMM process) is undone by its `Rollback`, and the VM is recorded as failed, with the reason
    /// (a cancelled boot leaves the record as it was for the caller to settle).
    async fn boot(
        self: &Arc<Self>,
        row: &VmRow,
        image: &ImageRow,
        cancel: &CancellationToken,
        op: Option<&Op>,
        plan: BootPlan,
    ) -> Result<BootInfo, ApiError> {
        let mut rollback = Rollback::new(format!("booting VM {}", row.name));
        let booted = self.boot_steps(row, image, cancel, op, plan, &mut rollback).await;
        let booted = settle(rollback, booted).await;
        if let Err(e) = &booted {
            if e.code != ErrorCode::Cancelled {
                let failed =
                    self.store.set_vm_state(row.id.clone(), VmState::Failed, None, None, Some(e.message.clone()));
                let _ = failed.await;
            }
        }
        booted
    }

    async fn boot_steps(
        self: &Arc<Self>,
        row: &VmRow,
        image: &ImageRow,
        cancel: &CancellationToken,
        op: Option<&Op>,
        plan: BootPlan,
        rollback: &mut Rollback,
    ) -> Result<BootInfo, ApiError> {
        let stage = |name: &str| {
            if let Some(op) = op {
                op.stage(name)
            }
        };
        let detail = |text: String| {
            if let Some(op) = op {
                op.detail(&text)
            }
        };
        let paths = self.vm_paths(&row.id);
        stage("network");
        let net = match (self.network(), row.ip, &row.mac) {
            (Some(net), Some(ip), Some(mac)) => {
                let tap = net.acquire_tap().await.map_err(|e| {
                    ApiError::internal(format!("cannot get a TAP device: {e}"))
                        .with_hint("`banger doctor` checks networking")
                })?;
                if let Err(e) = self.store.set_vm_tap(row.id.clone(), Some(tap.clone())).await {
                    net.release_tap(&tap).await;
                    return Err(e.into());
                }
                // From here on the record names the TAP, and `release_net` gives it back.
                self.undo_net(rollback, row);
                self.guard_tap(row, &tap).await?;
                Some((tap, net.guest_net(ip, mac)))
            }
            _ => None,
        };
        let started = std::time::Instant::now();
        self.store.set_vm_state(row.id.clone(), VmState::Starting, None, None, None).await?;
        stage("boot");
        let mut cold_reason = None;
        let mut warm = None;
        match plan {
            BootPlan::Cold { reason } => cold_reason = reason,
            BootPlan::Warm(t) => {
                detail(format!("restoring template {}", t.generation()));
                let identity = self.clone_identity(row);
                match self.restore_clone(image, &t, &row.id, &paths, net.clone(), identity, cancel).await {
                    Ok((pid, conn)) => {
                        stage("agent");
                        self.undo_vmm(rollback, row, pid);
                        let closing = conn.clone();
                        rollback.push("guest channel", async move { closing.close() });
                        self.store.set_vm_state(row.id.clone(), VmState::Starting, Some(pid), None, None).await?;
                        warm = Some((pid, conn));
                    }
                    Err(e) => cold_reason = Some(format!("restoring the template failed: {}", e.message)),
                }
                if warm.is_none() {
                    if cancel.is_cancelled() {
                        return Err(ApiError::new(ErrorCode::Cancelled, "cancelled"));
                    }
                    tracing::warn!(vm = %row.name, reason = ?cold_reason, "warm start failed; booting cold");
                    // The clone's disks sit on the template; a cold boot needs the image's.
                    self.make_disks(row, image, &paths).await?;
                }
            }
        }
        if let Some((pid, conn)) = warm {
            let boot = BootInfo { mode: BootMode::Warm, cold_reason: None, ms: started.elapsed().as_millis() as u64 };
            return self.finish_boot(row, pid, conn, op, boot).await;
        }
        if let Some(why) = &cold_reason {
            detail(format!("cold boot: {why}"));
        }
        let driver = self.driver(row.vmm);
        let spec = BootSpec {
            vm_id: row.id.clone(),
            hostname: row.name.clone(),
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            kernel: image.kernel.clone().into(),
            initrd: image.initrd.clone().map(Into::into),
            kernel_elf: image.kernel_elf.clone().map(Into::into),
            // The layout the VM's disks were made in (`make_disks`), kept for life.
            layout: vmm::RootLayout::of(&paths),
            drives: vmm::RootLayout::of(&paths).drives(
                &paths,
                std::path::Path::new(&image.rootfs),
                [paths.work_disk(), paths.work_disk_raw()].iter().any(|w| w.exists()),
            ),
            dir: paths.dir.clone(),
            net,
            extra_args: grow_args(&paths, image).into_iter().chain(self.ssh_key_arg()).collect(),
            vsock: driver.vsock(),
            memory: vmm::GuestMemory::Anonymous,
            template_mac: None,
            anchor: None,
        };
        // Under QEMU a vsock agent says when it listens by connecting to this socket; connecting before that
        // can leave the host's connection unanswered for good (`VSOCK_READY_PORT`). Firecracker's own vsock
        // refuses early connections cleanly, so there the host just retries, as it always has.
        let announced = driver.announces_vsock_ready().then(|| AnnounceSocket::bind(paths.vsock_ready()));
        let announced = announced
            .transpose()
            .map_err(|e| ApiError::internal(format!("cannot listen on {}: {e}", paths.vsock_ready().display())))?;
        let launched = driver.launch(&spec).await.map_err(vmm_error)?;
        self.undo_vmm(rollback, row, launched.pid);
        self.store.set_vm_state(row.id.clone(), VmState::Starting, Some(launched.pid), None, None).await?;
        stage("agent");
        let ready = async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(self.cfg.boot_timeout_secs);
            // Watch the VMM while waiting: a guest that died will never answer.
            let marker = vmm::process_marker(&row.id);
            let died = async {
                while crate::host::process_matches(launched.pid, &marker) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let channel = paths.guest_channel();
            let connect = async {
                if let Some(socket) = &announced {
                    // An agent older than the announcement never sends one: after a while, connect anyway.
                    tokio::select! {
                        r = tokio::time::timeout(VSOCK_ANNOUNCE_WAIT, socket.listener.accept()) => match r {
                            Ok(Ok(_)) => tracing::debug!(vm = %row.name, "the vsock agent announced it listens"),
                            _ => tracing::warn!(vm = %row.name, "no vsock announcement from the agent; connecting anyway"),
                        },
                        _ = cancel.cancelled() => {}
                    }
                }
                channel.ready(deadline, cancel).await
            };
            let agent = tokio::select! {
                r = connect => r.map_err(|e| guest_error(&row.name, e))?,
                _ = died => return Err(ApiError::internal(format!("VM {}'s VMM exited during boot", row.name))
                    .with_hint(format!("`banger vm logs {}` shows the guest console", row.name))),
            };
            Ok::<_, ApiError>(agent)
        }
        .await;
        drop(announced);
        match ready {
            Ok((conn, agent)) => {
                tracing::debug!(vm = %row.name, agent = %agent, "guest agent answered");
                let boot = BootInfo { mode: BootMode::Cold, cold_reason, ms: started.elapsed().as_millis() as u64 };
                self.finish_boot(row, launched.pid, conn, op, boot).await
            }
            Err(e) => {
                // A failed create removes the VM and its console log with it: say here how the guest ended.
                let mut seen = vec![];
                for (what, log) in [
                    ("the guest console", paths.console_log()),
                    ("vhost-device-vsock", paths.dir.join("vhost-vsock.log")),
                ] {
                    let tail = log_tail(&log, 8);
                    if !tail.is_empty() {
                        seen.push(format!("{what} ended with:\n{tail}"));
                    }
                }
                Err(if seen.is_empty() { e } else { e.with_hint(seen.join("\n")) })
            }
        }
    }

    /// The last steps of every boot, once the agent answers as this VM: logins synced in, DNS name, NAT,
    /// and the record marked running.
    async fn finish_boot(
        &self,
        row: &VmRow,
        pid: u32,
        conn: Arc<GuestConn>,
        op: Option<&Op>,
        boot: BootInfo,
    ) -> Result<BootInfo, ApiError> {
        if let Some(op) = op {
            op.stage("ready");
        }
        self.sync_into_guest(&row.name, &conn).await;
        self.guests.lock().insert(row.id.clone(), conn.clone());
        if let (Some(net), Some(ip)) = (self.network(), row.ip) {
            // The DNS name and NAT rule are undone with the network (`release_net`).
            net.dns.set(&row.name, ip);
            if row.nat {
                net.enable_nat(ip).await.map_err(|e| {
                    ApiError::new(ErrorCode::HostUnsupported, format!("cannot enable NAT for {}: {e}", row.name))
                        .with_hint("`banger doctor` checks nftables")
                })?;
            }
        }
        // Only a VM that will be kept gets its host key pinned.
        self.learn_host_key_later(row, conn);
        self.store.set_vm_state(row.id.clone(), VmState::Running, Some(pid), Some(now()), None).await?;
        tracing::info!(vm = %row.name, pid, mode = ?boot.mode, cold_reason = ?boot.cold_reason, boot_ms = boot.ms, "VM ready");
        self.boots.lock().insert(row.id.clone(), boot.clone());
        Ok(boot)
    }

    fn drop_guest(&self, id: &str) {
        if let Some(c) = self.guests.lock().remove(id) {
            c.close();
        }
    }

    /// The live guest connection of a running VM, reconnecting if the old one broke.
    pub(crate) async fn guest(&self, row: &VmRow) -> Result<Arc<GuestConn>, ApiError> {
        if row.state != VmState::Running {
            return Err(ApiError::precondition(format!("VM {} is {}", row.name, row.state.as_str()))
                .with_hint(format!("start it first: banger vm start {}", row.name)));
        }
        let live = || self.guests.lock().get(&row.id).filter(|c| !c.is_closed()).cloned();
        if let Some(c) = live() {
            return Ok(c);
        }
        // One connect per VM, shared by every caller that arrives meanwhile (after a daemon restart a burst
        // of calls finds no connection; a QEMU channel socket serves one client, so parallel connects would
        // fail with EAGAIN or wait behind each other). They all get its result when it ends: a guest that
        // does not answer costs them one wait, not one each in turn. Transient failures are retried inside
        // `ready`.
        let attempt = {
            let mut pending = self.guest_connects.lock();
            // Checked under the lock: a connect that just ended put its connection in `guests` before it left.
            if let Some(c) = live() {
                return Ok(c);
            }
            match pending.get(&row.id) {
                Some(attempt) => attempt.clone(),
                None => {
                    if !self.is_alive(row) {
                        return Err(ApiError::new(
                            ErrorCode::GuestUnreachable,
                            format!("VM {}'s VMM is not running", row.name),
                        )
                        .with_hint(format!("banger vm start {}", row.name)));
                    }
                    let (channel, name) = (self.vm_paths(&row.id).guest_channel(), row.name.clone());
                    let attempt = async move {
                        let deadline = tokio::time::Instant::now() + GUEST_CONNECT_WAIT;
                        let ready = channel.ready(deadline, &CancellationToken::new()).await;
                        ready.map(|(conn, _)| conn).map_err(|e| guest_error(&name, e))
                    }
                    .boxed()
                    .shared();
                    pending.insert(row.id.clone(), attempt.clone());
                    attempt
                }
            }
        };
        let result = attempt.clone().await;
        if let Ok(conn) = &result {
            self.guests.lock().insert(row.id.clone(), conn.clone());
        }
        // This attempt is over: the next caller without a live connection starts a new one.
        let mut pending = self.guest_connects.lock();
        if pending.get(&row.id).is_some_and(|p| p.ptr_eq(&attempt)) {
            pending.remove(&row.id);
        }
        result
    }

    /// What the VM's exec spool may still take (`exec_spool_mib`, shared by all its commands): measured from the
    /// folder the first time, then kept by the captures that draw from it and the prunes that give back.
    /// When it is spent the oldest spools go first (beyond the newest one), then output is cut.
    async fn spool_budget(&self, vm_id: &str, dir: &std::path::Path) -> Arc<std::sync::atomic::AtomicU64> {
        let cap = self.cfg.exec_spool_mib << 20;
        let known = self.spool_budgets.lock().get(vm_id).cloned();
        let budget = match known {
            Some(b) => b,
            None => {
                let used = folder_bytes(dir).await;
                let fresh = Arc::new(std::sync::atomic::AtomicU64::new(cap.saturating_sub(used)));
                self.spool_budgets.lock().entry(vm_id.to_string()).or_insert(fresh).clone()
            }
        };
        // Less than half left: make room by dropping the oldest kept outputs (the newest stays).
        if budget.load(std::sync::atomic::Ordering::Relaxed) < cap / 2 {
            give_back(&budget, prune_spools(dir, 1).await);
        }
        budget
    }

    /// Runs `op` for each distinct ref concurrently; results come back in the order the refs were given.
    async fn batch<F, Fut>(self: &Arc<Self>, refs: VmRefs, op: F) -> Result<VmBatchResult, ApiError>
    where
        F: Fn(Arc<Engine>, VmRow) -> Fut,
        Fut: std::future::Future<Output = Result<Option<VmInfo>, ApiError>>,
    {
        if refs.vms.is_empty() {
            return Err(ApiError::invalid("name at least one VM"));
        }
        let mut unique: Vec<String> = vec![];
        for r in refs.vms {
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

    pub async fn vm_start(self: &Arc<Self>, p: VmRefs, ctx: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| {
            let cancel = ctx.cancel.clone();
            async move { engine.start_one(row, cancel).await.map(Some) }
        })
        .await
    }

    async fn start_one(self: Arc<Self>, row: VmRow, cancel: CancellationToken) -> Result<VmInfo, ApiError> {
        let lock = self.vm_lock(&row.id);
        let _held = lock.lock().await;
        let row = self.reload(&row.id).await?;
        if row.state == VmState::Running && self.is_alive(&row) {
            return Ok(self.vm_info(&row).await);
        }
        let image = self.resolve_image(Some(&row.image_id)).await?;
        {
            // Its memory is promised again (a stopped VM holds none): admitted and recorded under one lock.
            let _alloc = self.alloc_lock.lock().await;
            let rows = self.store.vms().await?;
            let others: Vec<VmRow> = rows.into_iter().filter(|r| r.id != row.id).collect();
            self.admit_memory(&format!("starting VM {}", row.name), row.memory_mib as u64, &others)?;
            self.store.set_vm_state(row.id.clone(), VmState::Starting, None, None, None).await?;
        }
        let engine = self.clone();
        let task_row = row.clone();
        // A VM that exists boots cold from its own disks (a clone's disks are overlays of its template's).
        let plan = BootPlan::Cold { reason: None };
        let booted = tokio::spawn(async move {
            let Some(_slot) = engine.slots.acquire(&cancel, |_| {}).await else {
                return Err(ApiError::new(
                    ErrorCode::Cancelled,
                    format!("starting VM {} was cancelled", task_row.name),
                ));
            };
            engine.boot(&task_row, &image, &cancel, None, plan).await
        })
        .await
        .map_err(|e| ApiError::internal(format!("start task: {e}")))?;
        if let Err(e) = booted {
            // A boot that failed before its VMM ran leaves the record starting: it holds no memory now.
            if self.reload(&row.id).await.is_ok_and(|r| r.state == VmState::Starting) {
                let (state, why) = if e.code == ErrorCode::Cancelled {
                    (row.state, None)
                } else {
                    (VmState::Failed, Some(e.message.clone()))
                };
                let _ = self.store.set_vm_state(row.id.clone(), state, None, None, why).await;
            }
            return Err(e);
        }
        Ok(self.vm_info(&self.reload(&row.id).await?).await)
    }

    fn is_alive(&self, row: &VmRow) -> bool {
        row.pid.is_some_and(|pid| crate::host::process_matches(pid, &vmm::process_marker(&row.id)))
    }

    pub async fn vm_stop(self: &Arc<Self>, p: VmRefs, _: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| async move { engine.stop_one(row, false).await.map(Some) }).await
    }

    pub async fn vm_kill(self: &Arc<Self>, p: VmRefs, _: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| async move {
            engine.preempt(&row).await;
            engine.stop_one(row, true).await.map(Some)
        })
        .await
    }

    /// Kill and delete never wait behind a guest call: whoever holds the VM's lock may be waiting on a guest
    /// that never answers. Ending the VMM (marker-checked) and closing the channel makes every call on it
    /// fail at once, so the holder unwinds and releases the lock; the caller then takes it as usual.
    async fn preempt(&self, row: &VmRow) {
        if let Some(pid) = row.pid.filter(|_| self.is_alive(row)) {
            tracing::info!(vm = %row.name, pid, "ending the VMM before taking the VM lock");
            vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
        }
        self.drop_guest(&row.id);
    }

    pub async fn vm_restart(self: &Arc<Self>, p: VmRefs, ctx: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| {
            let cancel = ctx.cancel.clone();
            async move {
                engine.clone().stop_one(row.clone(), false).await?;
                engine.start_one(row, cancel).await.map(Some)
            }
        })
        .await
    }

    /// Stops a VM: asks the guest to power off and waits up to the grace period, then forces it.
    async fn stop_one(self: Arc<Self>, row: VmRow, force: bool) -> Result<VmInfo, ApiError> {
        let lock = self.vm_lock(&row.id);
        let _held = lock.lock().await;
        let row = self.reload(&row.id).await?;
        self.halt(&row, force).await?;
        Ok(self.vm_info(&self.reload(&row.id).await?).await)
    }

    /// Brings a VM to `stopped`, whatever state it is in. Caller holds the VM lock.
    async fn halt(&self, row: &VmRow, force: bool) -> Result<(), ApiError> {
        let marker = vmm::process_marker(&row.id);
        if let Some(pid) = row.pid.filter(|_| self.is_alive(row)) {
            self.store.set_vm_state(row.id.clone(), VmState::Stopping, Some(pid), None, None).await?;
            let mut gone = false;
            let conn = self.guests.lock().get(&row.id).cloned();
            self.record_sessions_at_halt(row, conn.clone()).await;
            if !force {
                let grace = Duration::from_secs(self.cfg.stop_grace_secs);
                if let Some(conn) = conn {
                    let _ = conn
                        .request(
                            &GuestRequest::Shutdown { reboot: false },
                            Duration::from_secs(3),
                            &CancellationToken::new(),
                        )
                        .await;
                }
                gone = vmm::wait_exit(pid, &marker, grace).await;
                if !gone {
                    tracing::warn!(vm = %row.name, "guest did not power off within the grace period; forcing");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    gone = vmm::wait_exit(pid, &marker, Duration::from_secs(3)).await;
                }
            }
            if !gone {
                vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
            }
        }
        self.drop_guest(&row.id);
        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, None).await;
        self.release_net(row).await;
        self.store.set_vm_state(row.id.clone(), VmState::Stopped, None, None, None).await?;
        Ok(())
    }

    /// Gives back what a VM holds on the network while it runs: its TAP, DNS name and NAT rule. The
    /// address stays allocated to the VM until it is deleted.
    async fn release_net(&self, row: &VmRow) {
        let Some(net) = self.network() else { return };
        net.dns.remove(&row.name);
        if let (true, Some(ip)) = (row.nat, row.ip) {
            if let Err(e) = net.disable_nat(ip).await {
                tracing::warn!(vm = %row.name, error = %e, "cannot remove NAT rule");
            }
        }
        // The row we hold may predate the TAP assignment; the store has the truth.
        let tap = match self.store.vm(row.id.clone()).await {
            Ok(Some(r)) => r.tap,
            _ => row.tap.clone(),
        };
        if let Some(tap) = tap {
            self.unguard_tap(row, &tap).await;
            net.release_tap(&tap).await;
            let _ = self.store.set_vm_tap(row.id.clone(), None).await;
        }
    }

    pub async fn vm_set(self: &Arc<Self>, p: VmSetParams, _: CallContext) -> Result<VmBatchResult, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
        let refs = VmRefs { vms: p.vms.clone() };
        self.batch(refs, |engine, row| {
            let p = p.clone();
            async move {
                let lock = engine.vm_lock(&row.id);
                let _held = lock.lock().await;
                let row = engine.reload(&row.id).await?;
                if matches!(row.state, VmState::Running | VmState::Starting | VmState::Stopping) {
                    return Err(ApiError::precondition(format!(
                        "VM {} is {}; its shape can change only while stopped",
                        row.name,
                        row.state.as_str()
                    ))
                    .with_hint(format!(
                        "banger vm stop {0} && banger vm set {0} ... && banger vm start {0}",
                        row.name
                    )));
                }
                let paths = engine.vm_paths(&row.id);
                // Check both disks before growing either, so a refusal changes nothing.
                let mut grow = vec![];
                for (field, gib, disk) in
                    [("disk_gib", p.disk_gib, paths.root_disk()), ("work_disk_gib", p.work_disk_gib, paths.work_disk())]
                {
                    let Some(gib) = gib else { continue };
                    let have = vmm::qcow2_virtual_size(&disk).ok_or_else(|| {
                        ApiError::precondition(format!(
                            "VM {} has no {} to resize",
                            row.name,
                            if field == "disk_gib" { "root disk" } else { "work disk" }
                        ))
                    })?;
                    let want = u64::from(gib) << 30;
                    if want < have {
                        return Err(ApiError::invalid(format!(
                            "VM {} has a {:.1} GiB disk; disks only grow, so {field} must be at least {}",
                            row.name,
                            have as f64 / (1u64 << 30) as f64,
                            have.div_ceil(1 << 30)
                        )));
                    }
                    if want > have {
                        grow.push((disk, want));
                    }
                }
                for (disk, want) in grow {
                    vmm::resize_disk(&engine.cfg, &disk, want).await.map_err(vmm_error)?;
                }
                engine.store.set_vm_shape(row.id.clone(), p.vcpus, p.memory_mib, p.nat).await?;
                Ok(Some(engine.vm_info(&engine.reload(&row.id).await?).await))
            }
        })
        .await
    }

    pub async fn vm_stats(self: &Arc<Self>, p: VmRef, ctx: CallContext) -> Result<VmStats, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let disk = self.vm_paths(&row.id).root_disk();
        let (mut cpu, mut rss) = (None, None);
        if let Some(pid) = row.pid.filter(|_| self.is_alive(&row)) {
            // utime and stime are fields 14 and 15 of /proc/PID/stat, in clock ticks.
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let fields: Vec<&str> =
                    stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
                let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
                cpu = Some((ticks(11) + ticks(12)) / hz);
            }
            rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .map(|kib| kib * 1024);
        }
        let guest = if row.state == VmState::Running {
            let conn = self.guest(&row).await?;
            match conn.request(&GuestRequest::Stats, Duration::from_secs(5), &ctx.cancel).await {
                Ok(tools_schema::guest::GuestResponse::Stats(s)) => Some(s),
                Ok(_) | Err(_) => None,
            }
        } else {
            None
        };
        use std::os::unix::fs::MetadataExt;
        Ok(VmStats {
            name: row.name.clone(),
            state: row.state,
            host_cpu_seconds: cpu,
            host_rss_bytes: rss,
            disk_bytes: vmm::qcow2_virtual_size(&disk),
            disk_host_bytes: std::fs::metadata(&disk).ok().map(|m| m.blocks() * 512),
            guest,
        })
    }

    pub async fn vm_ports(self: &Arc<Self>, p: VmRef, ctx: CallContext) -> Result<VmPorts, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let listeners = match conn.request(&GuestRequest::Ports, Duration::from_secs(10), &ctx.cancel).await {
            Ok(tools_schema::guest::GuestResponse::Ports { listeners }) => listeners,
            Ok(tools_schema::guest::GuestResponse::Error { message }) => {
                return Err(guest_error(&row.name, GuestError::Agent(message)))
            }
            Ok(other) => return Err(guest_error(&row.name, GuestError::Protocol(format!("{other:?}")))),
            Err(e) => return Err(guest_error(&row.name, e)),
        };
        let host = format!("{}.vm", row.name);
        let mut seen = std::collections::HashSet::new();
        let mut ports = vec![];
        for l in listeners {
            let loopback = l.address.starts_with("127.") || l.address == "::1";
            // 0.0.0.0 and :: on one port are one service: show it once.
            if !seen.insert((l.proto.clone(), l.port, loopback)) {
                continue;
            }
            let mut proto = if l.proto == "udp" { PortProtocol::Udp } else { PortProtocol::Tcp };
            let endpoint = if loopback {
                format!("{}:{} (guest only)", l.address, l.port)
            } else {
                if proto == PortProtocol::Tcp {
                    if let Some(ip) = row.ip {
                        proto = match crate::probe::probe(std::net::SocketAddr::from((ip, l.port)), &host).await {
                            crate::probe::Speaks::Tls => PortProtocol::Https,
                            crate::probe::Speaks::Http => PortProtocol::Http,
                            crate::probe::Speaks::Unknown => PortProtocol::Tcp,
                        };
                    }
                }
                match proto {
                    PortProtocol::Https => format!("https://{host}:{}/", l.port),
                    PortProtocol::Http => format!("http://{host}:{}/", l.port),
                    _ => format!("{host}:{}", l.port),
                }
            };
            ports.push(VmPort {
                proto,
                endpoint,
                port: l.port,
                bind: l.address,
                pid: l.pid,
                process: l.process,
                command: l.command,
            });
        }
        Ok(VmPorts { vm: row.name, ports })
    }

    pub async fn vm_file_write(
        self: &Arc<Self>,
        p: VmFileWriteParams,
        ctx: CallContext,
    ) -> Result<VmFileWriteResult, ApiError> {
        use base64::Engine as _;
        if !p.path.starts_with('/') {
            return Err(ApiError::invalid(format!("path must be absolute, got `{}`", p.path)));
        }
        let mode = p.mode.as_deref().map(parse_mode).transpose().map_err(ApiError::invalid)?;
        let data = match p.encoding.unwrap_or(ContentEncoding::Text) {
            ContentEncoding::Text => p.content.into_bytes(),
            ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.as_bytes())
                .map_err(|e| ApiError::invalid(format!("content is not valid base64: {e}")))?,
        };
        if data.len() as u64 > MAX_FILE_CHUNK {
            return Err(ApiError::invalid(format!(
                "content is {} bytes; at most {MAX_FILE_CHUNK} per call",
                data.len()
            ))
            .with_hint("write bigger files in chunks with append: true (banger vm cp does)"));
        }
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let size =
            conn.write_file(&p.path, mode, p.append, &data, &ctx.cancel).await.map_err(|e| file_error(&row.name, e))?;
        Ok(VmFileWriteResult {
            path: p.path,
            bytes: data.len() as u64,
            size,
            sha256: hex::encode(sha2::Sha256::digest(&data)),
        })
    }

    pub async fn vm_file_read(
        self: &Arc<Self>,
        p: VmFileReadParams,
        ctx: CallContext,
    ) -> Result<VmFileReadResult, ApiError> {
        if !p.path.starts_with('/') {
            return Err(ApiError::invalid(format!("path must be absolute, got `{}`", p.path)));
        }
        let limit = p.limit.unwrap_or(MAX_FILE_CHUNK);
        if limit == 0 || limit > MAX_FILE_CHUNK {
            return Err(ApiError::invalid(format!("limit must be between 1 and {MAX_FILE_CHUNK}, got {limit}")));
        }
        let offset = p.offset.unwrap_or(0);
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let (data, size, mode) =
            conn.read_file(&p.path, offset, limit, &ctx.cancel).await.map_err(|e| file_error(&row.name, e))?;
        let end = offset + data.len() as u64;
        let sha256 = hex::encode(sha2::Sha256::digest(&data));
        let (content, encoding) = encode_chunk(&data, p.encoding, &p.path)?;
        Ok(VmFileReadResult {
            path: p.path,
            content,
            encoding,
            offset,
            bytes: end - offset,
            size,
            eof: end >= size,
            next_offset: (end < size).then_some(end),
            mode: format!("{mode:04o}"),
            sha256,
        })
    }

    pub async fn vm_delete(self: &Arc<Self>, p: VmRefs, _: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| async move {
            engine.preempt(&row).await;
            let lock = engine.vm_lock(&row.id);
            let _held = lock.lock().await;
            let row = engine.reload(&row.id).await?;
            engine.halt(&row, true).await?;
            let dir = engine.vm_paths(&row.id).dir;
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(ApiError::internal(format!("removing {}: {e}", dir.display())));
                }
            }
            engine.store.delete_vm(row.id.clone()).await?;
            engine.forget_host_key(&row);
            engine.boots.lock().remove(&row.id);
            engine.spool_budgets.lock().remove(&row.id);
            tracing::info!(vm = %row.name, id = %row.id, "VM deleted");
            Ok(None)
        })
        .await
        .inspect(|_| {
            // Template generations only the deleted VMs' disks were built on can go now.
            let engine = self.clone();
            tokio::spawn(async move { engine.collect_templates().await });
        })
    }

    pub async fn vm_exec(self: &Arc<Self>, p: VmExecParams, ctx: CallContext) -> Result<VmExecResult, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
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
            return Err(ApiError::invalid(format!("limit must be between 1 and {EXEC_INLINE_MAX}, got {limit}")));
        }
        if p.output_id.is_empty() || !p.output_id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ApiError::invalid(format!("output_id `{}` is not one vm_exec returned", p.output_id)));
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
        .map_err(|e| ApiError::internal(format!("output read task: {e}")))?
        .map_err(|e| ApiError::internal(format!("reading command output: {e}")))?;
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

    pub async fn vm_logs(self: &Arc<Self>, p: VmLogsParams, _: CallContext) -> Result<VmLogs, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let tail = p.tail.unwrap_or(200) as usize;
        let path = self.vm_paths(&row.id).console_log();
        let read_path = path.clone();
        // Only the end of the console is read (the guest writes it; it is bounded by rotation anyway): the
        // current file's last TAIL_READ_BYTES, and the rotated one's when that holds too few lines.
        let lines = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let mut text = read_tail(&read_path, TAIL_READ_BYTES)?;
            let enough = |t: &[u8]| t.iter().filter(|b| **b == b'\n').count() > tail;
            if !enough(&text) {
                let mut older = read_tail(&rotated(&read_path), TAIL_READ_BYTES)?;
                older.extend_from_slice(&text);
                text = older;
            }
            Ok(String::from_utf8_lossy(&text).lines().map(str::to_string).collect())
        })
        .await
        .map_err(|e| ApiError::internal(format!("console read task: {e}")))?
        .map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display())))?;
        let start = lines.len().saturating_sub(tail);
        Ok(VmLogs { lines: lines[start..].to_vec(), path: path.display().to_string() })
    }

    /// Keeps every running VM's console log under `CONSOLE_MAX_BYTES` (a guest can print as fast as it likes)
    /// until `shutdown`: see `rotate_console`.
    pub async fn bound_console_logs(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CONSOLE_CHECK_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            let Ok(rows) = self.store.vms().await else { continue };
            let paths: Vec<_> = rows
                .iter()
                .filter(|r| matches!(r.state, VmState::Running | VmState::Starting | VmState::Stopping))
                .map(|r| self.vm_paths(&r.id).console_log())
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for p in paths {
                    if let Err(e) = rotate_console(&p, CONSOLE_MAX_BYTES) {
                        tracing::debug!(path = %p.display(), error = %e, "cannot rotate a console log");
                    }
                }
            })
            .await;
        }
    }

    /// Brings the store in line with reality after a daemon (re)start: running VMs whose VMM is still
    /// alive are adopted; dead ones are marked stopped; a create that never finished is rolled back.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ApiError> {
        let rows = self.store.vms().await?;
        for row in &rows {
            // The store may not have the pid yet if the daemon died right after launching the VMM; the
            // VMM's own pid file does.
            let pid = row.pid.or_else(|| self.pid_from_pidfile(&row.id));
            let marker = vmm::process_marker(&row.id);
            let alive = pid.is_some_and(|p| crate::host::process_matches(p, &marker));
            match row.state {
                VmState::Starting if row.started_at.is_none() => {
                    tracing::warn!(vm = %row.name, "rolling back a create interrupted by a daemon restart");
                    if let Some(pid) = pid {
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                    let _ = tokio::fs::remove_dir_all(self.vm_paths(&row.id).dir).await;
                    self.store.delete_vm(row.id.clone()).await?;
                }
                VmState::Running if alive => {
                    tracing::info!(vm = %row.name, pid = ?pid, "re-adopted running VM")
                }
                VmState::Running | VmState::Starting | VmState::Stopping => {
                    if let Some(pid) = pid.filter(|_| alive) {
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                    tracing::info!(vm = %row.name, "VM was not running after daemon restart; marked stopped");
                    self.store.set_vm_state(row.id.clone(), VmState::Stopped, None, None, None).await?;
                    // Network set-up, which runs next, reclaims TAPs no running VM holds.
                    self.store.set_vm_tap(row.id.clone(), None).await?;
                }
                VmState::Stopped | VmState::Failed => {
                    if let Some(pid) = pid.filter(|_| alive) {
                        tracing::warn!(vm = %row.name, pid, "killing a VMM that outlived its stopped VM");
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                }
            }
        }
        // Directories with no record are leftovers of a create or delete that died half-way.
        let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.vms_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                if known.contains(id.as_str()) {
                    continue;
                }
                // (Warm-pool VMs have no record either: the pool lives in the daemon's memory.)
                tracing::warn!(id = %id, "removing an orphaned VM directory");
                vmm::stop_vm_processes(&e.path(), &id, self.pid_from_pidfile(&id)).await;
                let _ = tokio::fs::remove_dir_all(e.path()).await;
            }
        }
        self.collect_templates().await;
        Ok(())
    }

    fn pid_from_pidfile(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.vm_paths(id).pidfile()).ok()?.trim().parse().ok()
    }
}

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

/// Creates a VM's directory, which must be new: a directory of that id that exists already belongs to
/// another VM (or a pooled one), and sharing it would mix their disks and sockets.
pub(crate) async fn create_vm_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", parent.display())))?;
    }
    tokio::fs::create_dir(dir).await.map_err(|e| {
        ApiError::internal(format!("creating {}: {e}", dir.display()))
            .with_hint("a directory of that id exists already; the daemon log says which VM holds it")
    })
}

impl Engine {
    /// The public key for the guest's authorized_keys, on the kernel command line (base64, no spaces).
    fn ssh_key_arg(&self) -> Option<String> {
        use base64::Engine as _;
        let public = std::fs::read_to_string(self.cfg.ssh_key().with_extension("pub")).ok()?;
        Some(format!("banger.sshkey={}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(public.trim())))
    }
}

/// A VM's own sparse copy (reflinked where the filesystem can) of a read-only disk: an image's work seed or a
/// template's disks.
pub(crate) async fn copy_writable(from: &std::path::Path, to: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    vmm::copy_sparse(from, to).await.map_err(vmm_error)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(crate::host_files::PRIVATE_FILE))
        .map_err(|e| ApiError::internal(format!("making {} writable: {e}", to.display())))
}

/// The socket a booting vsock agent announces itself on; removed with this value, whatever the boot's outcome.
struct AnnounceSocket {
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
}

impl AnnounceSocket {
    fn bind(path: std::path::PathBuf) -> std::io::Result<AnnounceSocket> {
        let _ = std::fs::remove_file(&path); // left by a daemon that died mid-boot
        Ok(AnnounceSocket { listener: tokio::net::UnixListener::bind(&path)?, path })
    }
}

impl Drop for AnnounceSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long a cold boot waits for a vsock agent to say it listens before connecting regardless.
const VSOCK_ANNOUNCE_WAIT: Duration = Duration::from_secs(20);

/// Most of a console log kept before it is rotated (to `console.log.1`): a guest printing without pause costs
/// at most about twice this on disk, plus what it prints between two checks.
const CONSOLE_MAX_BYTES: u64 = 4 << 20;
const CONSOLE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How much of the end of a log is read to find its last lines.
const TAIL_READ_BYTES: u64 = 1 << 20;

/// `<path>.1`: where a rotated log's previous part is.
fn rotated(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    p.into()
}

/// Moves a console log that outgrew `max` to `.1` and empties it. The VMM keeps its descriptor (QEMU's
/// chardev with `append=on`, Firecracker's stdout opened O_APPEND), so it goes on writing at the new end of
/// the same file: a copy and a truncate, not a rename. Lines written between the two are lost.
fn rotate_console(path: &std::path::Path, max: u64) -> std::io::Result<()> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(());
    }
    let mut from = std::fs::File::open(path)?;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut to = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(rotated(path))?;
    // At most `max` bytes (the end) go to `.1`, so it stays bounded even when a check came late.
    use std::io::{Seek, SeekFrom};
    from.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    std::io::copy(&mut std::io::Read::take(&mut from, max), &mut to)?;
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// The last `max` bytes of a file (nothing if it does not exist).
fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut data = vec![];
    f.take(max).read_to_end(&mut data)?;
    Ok(data)
}

/// The last `lines` non-blank lines of a log (the console, a helper's), for errors about guests that never answered.
fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&read_tail(path, TAIL_READ_BYTES).unwrap_or_default()).into_owned();
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Tells the agent which filesystems to grow at boot: a disk grown by `vm set` is bigger than its base.
fn grow_args(paths: &VmPaths, image: &ImageRow) -> Vec<String> {
    let mut grow = vec![];
    if vmm::qcow2_virtual_size(&paths.root_disk()).is_some_and(|s| s > image.rootfs_bytes) {
        grow.push("root");
    }
    let seed = std::fs::metadata(&image.work_seed).map(|m| m.len()).unwrap_or(u64::MAX);
    if vmm::qcow2_virtual_size(&paths.work_disk()).is_some_and(|s| s > seed) {
        grow.push("work");
    }
    if grow.is_empty() {
        vec![]
    } else {
        vec![format!("banger.growfs={}", grow.join(","))]
    }
}

/// Removes one command's spool files; returns the bytes freed.
async fn remove_spool(dir: &std::path::Path, id: &str) -> u64 {
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
fn give_back(budget: &std::sync::atomic::AtomicU64, freed: u64) {
    budget.fetch_add(freed, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes in a folder's files (not recursive).
async fn folder_bytes(dir: &std::path::Path) -> u64 {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else { return 0 };
    let mut total = 0;
    while let Ok(Some(e)) = rd.next_entry().await {
        total += e.metadata().await.map_or(0, |m| m.len());
    }
    total
}

/// Keeps the spools of the newest `keep` commands in `dir`; returns the bytes freed.
async fn prune_spools(dir: &std::path::Path, keep: usize) -> u64 {
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
