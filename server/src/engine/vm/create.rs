//! Creating a VM: checks, allocation (name, address, MAC, pool slot, memory promise), disks, and handing a pooled VM out.
use super::*;
use tools_schema::boot::GrowFs;

/// Tells the agent which filesystems to grow at boot: a disk grown by `vm set` is bigger than its base.
pub(super) fn filesystems_to_grow(paths: &VmPaths, image: &ImageRow) -> Vec<GrowFs> {
    let mut grow = vec![];
    if vmm::qcow2_virtual_size(&paths.root_disk()).is_some_and(|s| s > image.rootfs_bytes) {
        grow.push(GrowFs::Root);
    }
    let seed = std::fs::metadata(&image.work_seed).map(|m| m.len()).unwrap_or(u64::MAX);
    if vmm::qcow2_virtual_size(&paths.work_disk()).is_some_and(|s| s > seed) {
        grow.push(GrowFs::Work);
    }
    grow
}

impl Engine {
    /// Creates a VM and waits until it is ready, reporting stages as progress.
    pub async fn vm_create(self: &Arc<Self>, p: VmCreateParams, ctx: CallContext) -> Result<VmInfo, ApiError> {
        let info = self.vm_create_begin(p, ctx.clone()).await?;
        let op = self.ops.get(&info.id)?;
        let snap = crate::engine::operation::follow(&op, &ctx).await;
        match (snap.vm, snap.error) {
            (Some(vm), _) => Ok(vm),
            (None, Some(e)) => Err(e),
            (None, None) => {
                Err(ApiError::internal("create ended without a result").with_hint(crate::engine::errors::hint::BUG))
            }
        }
    }

    /// Validates, allocates and records the VM, then boots it in the background. Argument and allocation
    /// errors come back at once; everything after is reported through the operation.
    pub async fn vm_create_begin(
        self: &Arc<Self>,
        p: VmCreateParams,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        p.validate().map_err(|e| {
            let fix = crate::engine::arguments::create_in_range(&p, |args| args);
            crate::engine::arguments::invalid("vm.create", e, fix)
        })?;
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
        crate::engine::operation::run(&op, work, |vm: &VmInfo| vm.clone().into());
        Ok(op.snapshot())
    }

    /// A VMM that needs hardware KVM (Firecracker: on paravirtual KVM an ordinary guest kernel dies mid-boot)
    /// needs it, its binary, and an ELF kernel in the image if it boots one. Said before anything is made.
    pub(super) fn check_driver(&self, driver: &vmm::Driver, image: &ImageRow) -> Result<(), ApiError> {
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
            .with_hint("ask for vmm qemu, or leave vmm out: QEMU runs guests on this host"));
        }
        if driver.find_binary().is_none() {
            return Err(vmm_error(VmmError::MissingBinary { binary: driver.binary() }));
        }
        if driver.needs_elf_kernel() && image.kernel_elf.is_none() {
            return Err(ApiError::precondition(format!(
                "image {} has no ELF kernel, which Firecracker boots",
                image.name
            ))
            .with_hint("register the image again with its ELF kernel (kernel_elf; scripts/quickstart.sh does)"));
        }
        Ok(())
    }

    /// Checks the request against daemon state, picks name and address, and records the VM as starting.
    /// A VM restored earlier and waiting in the warm pool is taken when image and shape match; its id
    /// becomes the new VM's (its directory and VMM marker already carry it).
    pub(super) async fn allocate_vm(
        &self,
        p: VmCreateParams,
    ) -> Result<(VmRow, ImageRow, Option<crate::engine::warm::PoolEntry>), ApiError> {
        let image = self.resolve_image(p.image.as_deref()).await?;
        let vmm = p.vmm.unwrap_or(self.vmm().vmm);
        self.check_driver(&self.driver(vmm), &image)?;
        let (vcpus, memory_mib) =
            (p.vcpus.unwrap_or(self.cfg.default_vcpus), p.memory_mib.unwrap_or(self.cfg.default_memory_mib));
        // Name, address, MAC, pool entry and memory promise are taken under one lock: what the checks saw
        // is still true when the record is written.
        let _alloc = self.admission.allocating().await;
        // Pooled VMs run on the host's VMM.
        let pooled = (vmm == self.vmm().vmm && p.boot.unwrap_or_default() == BootRequest::Auto)
            .then(|| self.warm.pool.take(&image.id, vcpus, memory_mib))
            .flatten();
        let allocated =
            self.allocate_row(p, &image, vmm, vcpus, memory_mib, pooled.as_ref().map(|e| e.id.clone())).await;
        match allocated {
            Ok(row) => Ok((row, image, pooled)),
            Err(e) => {
                if let Some(entry) = pooled {
                    self.warm.pool.put_back(entry);
                }
                Err(e)
            }
        }
    }

    /// Picks name, address and MAC, admits the VM's memory and records it as starting. The caller holds
    /// `Admission::allocating`; `id` is a pooled VM's, whose memory is already promised.
    pub(super) async fn allocate_row(
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
                        .with_hint("pick another name, or delete that VM first")
                        .with_next("vm.list", serde_json::json!({}), "shows the names in use")
                        .with_next(
                            "vm.delete",
                            serde_json::json!({"vm": n}),
                            "deletes the existing VM (irreversible)",
                        ));
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
            vmm_uid: None,
            cpu_percent: None,
        };
        self.store.insert_vm(row.clone()).await.map_err(|e| {
            ApiError::new(ErrorCode::AlreadyExists, format!("cannot record VM `{}`: {e}", row.name))
                .with_hint("pick another name")
                .with_next("vm.list", serde_json::json!({}), "shows the names in use")
        })?;
        Ok(row)
    }

    /// Everything of a create after its record: queue, disks, boot. Whatever it made is undone, newest
    /// first, when it fails or is cancelled (`Rollback`); `boot` undoes its own part (VMM, network) first.
    pub(super) async fn create_inner(
        self: Arc<Self>,
        row: VmRow,
        image: ImageRow,
        op: &Op,
        cold: bool,
        pooled: Option<crate::engine::warm::PoolEntry>,
    ) -> Result<(), ApiError> {
        let paths = self.vm_paths(&row.id);
        let cancel = op.cancel.clone();
        let cancelled = || {
            ApiError::new(ErrorCode::Cancelled, format!("creating VM {} was cancelled; nothing was kept", row.name))
                .with_hint("run the create again to retry")
        };
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
                .admission
                .slots
                .acquire(&cancel, |ahead| op.detail(&crate::engine::admission::waiting_message(ahead)))
                .await
                .ok_or_else(cancelled)?;
            op.stage("disks");
            crate::engine::disks::create_vm_dir(&paths.dir).await?;
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
                Err(miss) if !matches!(miss, crate::engine::warm::TemplateMiss::Failed(_)))
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
    pub(super) async fn make_disks(&self, row: &VmRow, image: &ImageRow, paths: &VmPaths) -> Result<(), ApiError> {
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
            crate::engine::disks::copy_writable(std::path::Path::new(&image.work_seed), &paths.work_disk_raw()).await?;
        }
        Ok(())
    }

    /// Hands a pooled VM (restored earlier, waiting) to a new record: its TAP, then its own identity.
    pub(super) async fn adopt_pooled(
        self: &Arc<Self>,
        row: &VmRow,
        entry: crate::engine::warm::PoolEntry,
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
            // Restored before it had a record, it runs as a uid of its own already: from now on the VM's.
            if let Some(uid) = crate::host::process_uid(entry.pid).filter(|u| self.contain.ids.contains(*u)) {
                self.store.claim_vm_uid(row.id.clone(), uid).await?;
            }
            op.stage("agent");
            self.reidentify(row, &entry.conn).await?;
            let boot = BootInfo { mode: BootMode::Pool, cold_reason: None, ms: started.elapsed().as_millis() as u64 };
            self.finish_boot(row, entry.pid, entry.conn.clone(), Some(op), boot).await
        }
        .await;
        settle(rollback, adopted).await
    }

    /// Undoing a boot's VMM: the guest connection closed, the process (and its helpers) ended.
    pub(super) fn undo_vmm(self: &Arc<Self>, rollback: &mut Rollback, row: &VmRow, pid: u32) {
        let (engine, id) = (self.clone(), row.id.clone());
        rollback.push("vmm", async move {
            engine.guests.close(&id);
            vmm::stop_vm_processes(&engine.vm_paths(&id).dir, &id, Some(pid)).await;
        });
    }

    /// Undoing a boot's network: DNS name, NAT, the TAP's filter, the TAP back to the pool.
    pub(super) fn undo_net(self: &Arc<Self>, rollback: &mut Rollback, row: &VmRow) {
        let (engine, row) = (self.clone(), row.clone());
        rollback.push("network", async move { engine.release_net(&row).await });
    }

    /// The public key for the guest's authorized_keys (`BootArgs::ssh_key`).
    pub(crate) fn ssh_public_key(&self) -> Option<String> {
        let public = std::fs::read_to_string(self.cfg.ssh_key().with_extension("pub")).ok()?;
        Some(public.trim().to_string())
    }
}
