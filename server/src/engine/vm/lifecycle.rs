//! start, stop, kill, restart, set and delete, one VM at a time within a batch.
use super::*;

impl Engine {
    pub async fn vm_start(self: &Arc<Self>, p: VmRefs, ctx: CallContext) -> Result<VmBatchResult, ApiError> {
        self.batch(p, |engine, row| {
            let cancel = ctx.cancel.clone();
            async move { engine.start_one(row, cancel).await.map(Some) }
        })
        .await
    }

    pub(super) async fn start_one(self: Arc<Self>, row: VmRow, cancel: CancellationToken) -> Result<VmInfo, ApiError> {
        let lock = self.vm_lock(&row.id);
        let _held = lock.lock().await;
        let row = self.reload(&row.id).await?;
        if row.state == VmState::Running && self.is_alive(&row) {
            return Ok(self.vm_info(&row).await);
        }
        let image = self.resolve_image(Some(&row.image_id)).await?;
        {
            // Its memory is promised again (a stopped VM holds none): admitted and recorded under one lock.
            let _alloc = self.admission.allocating().await;
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
            let Some(_slot) = engine.admission.slots.acquire(&cancel, |_| {}).await else {
                return Err(ApiError::new(
                    ErrorCode::Cancelled,
                    format!("starting VM {} was cancelled", task_row.name),
                )
                .with_hint("it is stopped again")
                .with_next("vm.start", serde_json::json!({"vm": task_row.name}), "starts it again"));
            };
            engine.boot(&task_row, &image, &cancel, None, plan).await
        })
        .await
        .map_err(|e| ApiError::internal(format!("start task: {e}")).with_hint(crate::engine::errors::hint::BUG))?;
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
    pub(super) async fn preempt(&self, row: &VmRow) {
        if let Some(pid) = row.pid.filter(|_| self.is_alive(row)) {
            tracing::info!(vm = %row.name, pid, "ending the VMM before taking the VM lock");
            vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
        }
        self.guests.close(&row.id);
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
    pub(super) async fn stop_one(self: Arc<Self>, row: VmRow, force: bool) -> Result<VmInfo, ApiError> {
        let lock = self.vm_lock(&row.id);
        let _held = lock.lock().await;
        let row = self.reload(&row.id).await?;
        self.halt(&row, force).await?;
        Ok(self.vm_info(&self.reload(&row.id).await?).await)
    }

    /// Brings a VM to `stopped`, whatever state it is in. Caller holds the VM lock.
    pub(super) async fn halt(&self, row: &VmRow, force: bool) -> Result<(), ApiError> {
        let marker = vmm::process_marker(&row.id);
        if let Some(pid) = row.pid.filter(|_| self.is_alive(row)) {
            self.store.set_vm_state(row.id.clone(), VmState::Stopping, Some(pid), None, None).await?;
            let mut gone = false;
            let conn = self.guests.last(&row.id);
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
        self.guests.close(&row.id);
        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, None).await;
        self.release_net(row).await;
        self.store.set_vm_state(row.id.clone(), VmState::Stopped, None, None, None).await?;
        Ok(())
    }

    /// Gives back what a VM holds on the network while it runs: its TAP, DNS name and NAT rule. The
    /// address stays allocated to the VM until it is deleted.
    pub(super) async fn release_net(&self, row: &VmRow) {
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
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let refs = VmRefs { vm: p.vm.clone() };
        self.batch(refs, |engine, row| {
            let p = p.clone();
            async move {
                let lock = engine.vm_lock(&row.id);
                let _held = lock.lock().await;
                let row = engine.reload(&row.id).await?;
                let running = matches!(row.state, VmState::Running | VmState::Starting | VmState::Stopping);
                if running && p.is_live() {
                    engine.set_cpu_limit_live(&row, p.cpu_percent.unwrap_or(0)).await?;
                    return Ok(Some(engine.vm_info(&engine.reload(&row.id).await?).await));
                }
                if running {
                    return Err(ApiError::precondition(format!(
                        "VM {} is {}; its shape can change only while stopped",
                        row.name,
                        row.state.as_str()
                    ))
                    .with_hint("stop it, set the new shape, start it again (only cpu_percent applies to a running VM)")
                    .with_next("vm.stop", serde_json::json!({"vm": row.name}), "stops it"));
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
                        )).with_hint("this VM's disks are raw (the overlay layout), which `vm set` cannot grow; create a VM with the size you need")
                    })?;
                    let want = u64::from(gib) << 30;
                    if want < have {
                        return Err(ApiError::invalid(format!(
                            "VM {} has a {:.1} GiB disk; disks only grow, so {field} must be at least {}",
                            row.name,
                            have as f64 / (1u64 << 30) as f64,
                            have.div_ceil(1 << 30)
                        )).with_hint("give a size at least as large as the current disk"));
                    }
                    if want > have {
                        grow.push((disk, want));
                    }
                }
                for (disk, want) in grow {
                    vmm::resize_disk(&engine.cfg, &disk, want).await.map_err(vmm_error)?;
                }
                engine.store.set_vm_shape(row.id.clone(), p.vcpus, p.memory_mib, p.nat).await?;
                if let Some(percent) = p.cpu_percent {
                    engine.store.set_vm_cpu_percent(row.id.clone(), (percent != 0).then_some(percent)).await?;
                }
                Ok(Some(engine.vm_info(&engine.reload(&row.id).await?).await))
            }
        })
        .await
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
                    return Err(ApiError::internal(format!("removing {}: {e}", dir.display())).with_hint(
                        "check the permissions of the VM's directory under the state directory and remove it by hand",
                    ));
                }
            }
            engine.store.delete_vm(row.id.clone()).await?;
            engine.forget_host_key(&row);
            engine.vms.forget(&row.id);
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
}
