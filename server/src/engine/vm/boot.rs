//! Booting a VM cold or warm and waiting for its agent; everything made on the way is undone by the boot's `Rollback`.
use super::*;

/// The socket a booting vsock agent announces itself on; removed with this value, whatever the boot's outcome.
pub(super) struct AnnounceSocket {
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
pub(super) const VSOCK_ANNOUNCE_WAIT: Duration = Duration::from_secs(20);

impl Engine {
    /// Brings the VM up, warm from a template when the plan says so (falling back to a cold boot, with
    /// the reason, if the restore fails), and waits for the guest agent. On failure everything it made
    /// (network, VMM process) is undone by its `Rollback`, and the VM is recorded as failed, with the reason
    /// (a cancelled boot leaves the record as it was for the caller to settle).
    pub(super) async fn boot(
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

    pub(super) async fn boot_steps(
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
                        .with_hint("the host's TAP pool or bridge is not usable")
                        .with_next("doctor.run", serde_json::json!({}), "checks networking")
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
                        return Err(ApiError::new(ErrorCode::Cancelled, "cancelled")
                            .with_hint(crate::engine::errors::hint::RUN_AGAIN));
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
        let mut spec = BootSpec {
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
            args: tools_schema::boot::BootArgs {
                grow: super::create::filesystems_to_grow(&paths, image),
                ssh_key: self.ssh_public_key(),
                ..Default::default()
            },
            vsock: driver.vsock(),
            memory: vmm::GuestMemory::Anonymous,
            template_mac: None,
            anchor: None,
            contain: None,
        };
        // Under QEMU a vsock agent says when it listens by connecting to this socket; connecting before that
        // can leave the host's connection unanswered for good (`VSOCK_READY_PORT`). Firecracker's own vsock
        // refuses early connections cleanly, so there the host just retries, as it always has.
        let announced = driver.announces_vsock_ready().then(|| AnnounceSocket::bind(paths.vsock_ready()));
        let announced = announced.transpose().map_err(|e| {
            ApiError::internal(format!("cannot listen on {}: {e}", paths.vsock_ready().display()))
                .with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
        // Made last before the launch, which removes the VM's cgroup whenever it fails; only the grant below
        // can fail in between, and it removes the cgroup itself.
        spec.contain = self.containment(&row.id, row.vcpus, row.memory_mib).await?;
        // The announcement arrives through vhost-device-vsock, which runs as the VM's uid: let its group connect.
        if let (Some(_), Some(c)) = (&announced, &spec.contain) {
            if let Err(e) = vmm::contain::grant(&paths.vsock_ready(), c.gid(), 0o060) {
                if let Some(cgroup) = &c.cgroup {
                    cgroup.remove();
                }
                return Err(ApiError::internal(format!(
                    "giving {} to the VM's group: {e}",
                    paths.vsock_ready().display()
                ))
                .with_hint(crate::engine::errors::hint::STATE_DIR));
            }
        }
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
                    .with_hint("the guest's console says how far it got")
                    .with_next("vm.logs", serde_json::json!({"vm": row.name}), "shows the guest console")),
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
                    let tail = super::inspect::log_tail(&log, 8);
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
    pub(super) async fn finish_boot(
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
        self.guests.adopt(&row.id, conn.clone());
        if let (Some(net), Some(ip)) = (self.network(), row.ip) {
            // The DNS name and NAT rule are undone with the network (`release_net`).
            net.dns.set(&row.name, ip);
            if row.nat {
                net.enable_nat(ip).await.map_err(|e| {
                    ApiError::new(ErrorCode::HostUnsupported, format!("cannot enable NAT for {}: {e}", row.name))
                        .with_hint("the host's nftables refused the rule")
                        .with_next("doctor.run", serde_json::json!({}), "checks nftables")
                })?;
            }
        }
        // Only a VM that will be kept gets its host key pinned.
        self.learn_host_key_later(row, conn);
        self.store.set_vm_state(row.id.clone(), VmState::Running, Some(pid), Some(now()), None).await?;
        tracing::info!(vm = %row.name, pid, mode = ?boot.mode, cold_reason = ?boot.cold_reason, boot_ms = boot.ms, "VM ready");
        self.vms.booted(&row.id, boot.clone());
        Ok(boot)
    }
}
