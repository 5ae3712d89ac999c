//! The warm pool: restored VMs waiting to be handed out, refilled in the background within host memory.
use super::*;

pub(super) fn pool_promise(pool: &[PoolEntry], filling: &HashMap<String, usize>, fill_memory_mib: u32) -> u64 {
    pool.iter().map(|e| e.memory_mib as u64).sum::<u64>()
        + filling.values().sum::<usize>() as u64 * fill_memory_mib as u64
}

/// The NIC settings of a VM whose real ones arrive with `Reidentify` (templates, pooled VMs): never in a
/// guest, since a template's command line carries none.
pub(super) fn placeholder_net() -> crate::network::GuestNet {
    crate::network::GuestNet {
        ip: std::net::Ipv4Addr::UNSPECIFIED,
        prefix: 32,
        gateway: std::net::Ipv4Addr::UNSPECIFIED,
        mac: vmm::TEMPLATE_MAC.into(),
    }
}

impl Engine {
    /// Refills the warm pool of the default image (default shape) in the background, as far as the size in
    /// the config and the host's available memory allow.
    pub(crate) fn refill_pool_later(self: &Arc<Self>) {
        if (self.cfg.warm.pool_size == 0 && self.cfg.warm.pools.values().all(|n| *n == 0))
            || self.warm_unsupported(self.vmm().vmm).is_some()
        {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.refill_pool().await {
                tracing::warn!(error = %e.message, "warm pool refill failed");
            }
        });
    }

    /// The pool sizes the config asks for, by image: `pool_size` for the default image, `pools` by name.
    pub(super) async fn pool_targets(&self) -> Result<Vec<(ImageRow, usize)>, ApiError> {
        let images = self.store.images().await?;
        let mut targets: Vec<(ImageRow, usize)> = vec![];
        let mut add = |image: &ImageRow, n: usize| match targets.iter_mut().find(|(i, _)| i.id == image.id) {
            Some(t) => t.1 = t.1.max(n),
            None => targets.push((image.clone(), n)),
        };
        if let Some(default) = images.iter().find(|i| i.is_default) {
            add(default, self.cfg.warm.pool_size as usize);
        }
        for (name, n) in &self.cfg.warm.pools {
            match images.iter().find(|i| &i.name == name) {
                Some(image) => add(image, *n as usize),
                None => tracing::debug!(image = %name, "warm.pools names an image that is not registered"),
            }
        }
        targets.retain(|(_, n)| *n > 0);
        Ok(targets)
    }

    pub(super) async fn refill_pool(self: &Arc<Self>) -> Result<(), ApiError> {
        let targets = self.pool_targets().await?;
        let (vcpus, memory_mib) = (self.cfg.default_vcpus, self.cfg.default_memory_mib);
        // Pooled VMs of images no longer pooled (the default changed, the image went) only hold memory.
        let stale: Vec<PoolEntry> = {
            let mut pool = self.warm.pool.lock();
            let (keep, stale) =
                std::mem::take(&mut *pool).into_iter().partition(|e| targets.iter().any(|(i, _)| i.id == e.image_id));
            *pool = keep;
            stale
        };
        for e in stale {
            self.end_pooled(e).await;
        }
        for (image, size) in targets {
            loop {
                {
                    // A refill is promised its memory like a create, under the same lock (admission.rs).
                    let _alloc = self.alloc_lock.lock().await;
                    let rows = self.store.vms().await?;
                    let pool = self.warm.pool.lock();
                    let mut filling = self.warm.pool_filling.lock();
                    let have = pool.iter().filter(|e| e.image_id == image.id).count()
                        + filling.get(&image.id).copied().unwrap_or(0);
                    if have >= size {
                        break;
                    }
                    let host = crate::engine::admission::HostCapacity::read();
                    let available = host.available_mib;
                    if available < memory_mib as u64 + self.cfg.warm.pool_reserve_mib {
                        tracing::info!(available_mib = available, "warm pool not refilled: host memory is short");
                        return Ok(());
                    }
                    let promised = crate::engine::admission::recorded_promise_mib(&rows)
                        + pool_promise(&pool, &filling, memory_mib);
                    let budget = crate::engine::admission::memory_budget_mib(&self.cfg.limits, &host);
                    if let Err(e) = crate::engine::admission::admit("a pooled VM", memory_mib as u64, promised, budget)
                    {
                        tracing::info!(reason = %e.message, "warm pool not refilled: the memory budget is spent");
                        return Ok(());
                    }
                    *filling.entry(image.id.clone()).or_default() += 1;
                }
                // Restores are boots: they take their turn with creates.
                let slot = self.slots.acquire(&CancellationToken::new(), |_| {}).await;
                let entry = self.pool_entry(&image, vcpus, memory_mib).await;
                drop(slot);
                *self.warm.pool_filling.lock().entry(image.id.clone()).or_default() -= 1;
                self.warm.pool.lock().push(entry?);
            }
        }
        Ok(())
    }

    /// Restores one clone for the pool.
    pub(super) async fn pool_entry(
        self: &Arc<Self>,
        image: &ImageRow,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<PoolEntry, ApiError> {
        // Pooled VMs run on the host's VMM, which is what a create without --vmm gets.
        let vmm = self.vmm().vmm;
        let t = match self.find_template(image, vmm, vcpus, memory_mib) {
            Ok(t) => t,
            Err(_) => {
                self.ensure_template(image, vmm, vcpus, memory_mib, false, &CancellationToken::new()).await?;
                self.find_template(image, vmm, vcpus, memory_mib).map_err(|miss| {
                    ApiError::internal(miss.to_string()).with_hint(
                        "the pool refills later by itself; `banger image warm --rebuild` makes the template anew",
                    )
                })?
            }
        };
        let id = new_id();
        let paths = self.vm_paths(&id);
        // Before `result`: a directory that exists is another VM's, and a failure must not remove it.
        crate::engine::vm::create_vm_dir(&paths.dir).await?;
        let result = async {
            self.clone_disks(&t, &paths).await?;
            let tap = match self.network() {
                Some(net) if t.meta.inputs.nic => Some(net.acquire_tap().await.map_err(|e| {
                    ApiError::internal(format!("cannot get a TAP device: {e}"))
                        .with_hint("`banger doctor` checks networking")
                })?),
                _ => None,
            };
            // The NIC's settings come with the identity at hand-out; the placeholder never reaches the guest.
            let placeholder = tap.clone().map(|t| (t, placeholder_net()));
            // A dry run with a placeholder identity, so the hand-out's real one finds warm code paths.
            let rehearsal = CloneIdentity {
                hostname: "banger-pool".into(),
                net: t.meta.inputs.nic.then(|| GuestNetConfig {
                    address: "169.254.77.77/32".into(),
                    gateway: String::new(),
                    dns: String::new(),
                    mac: vmm::TEMPLATE_MAC.into(),
                }),
                ssh_authorized_key: None,
                entropy_hex: hex::encode(rand::random::<[u8; 64]>()),
                unix_time_ns: self.clone_identity_time(),
                rehearsal: true,
            };
            let cancel = CancellationToken::new();
            match self.restore_clone(image, &t, &id, &paths, placeholder, rehearsal, &cancel).await {
                Ok((pid, conn)) => {
                    // The hand-out's sync rehearsed too: its file reads and writes find translated code, and
                    // the identity already in place is only read again (refreshed if it changed meanwhile).
                    self.sync_into_guest(&format!("pool {id}"), &conn).await;
                    Ok(PoolEntry { id: id.clone(), image_id: image.id.clone(), vcpus, memory_mib, pid, tap, conn })
                }
                Err(e) => {
                    if let (Some(net), Some(tap)) = (self.network(), tap) {
                        net.release_tap(&tap).await;
                    }
                    Err(e)
                }
            }
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&paths.dir).await;
        }
        result
    }

    pub(crate) async fn warm_pool_status(&self) -> tools_schema::daemon::WarmPoolStatus {
        let targets = self.pool_targets().await.unwrap_or_default();
        let pool = self.warm.pool.lock();
        let filling = self.warm.pool_filling.lock();
        let images = targets
            .iter()
            .map(|(image, size)| tools_schema::daemon::WarmPoolImage {
                image: image.name.clone(),
                size: *size as u32,
                ready: pool.iter().filter(|e| e.image_id == image.id).count() as u32,
                filling: filling.get(&image.id).copied().unwrap_or(0) as u32,
            })
            .collect::<Vec<_>>();
        tools_schema::daemon::WarmPoolStatus {
            size: images.iter().map(|i| i.size).sum(),
            ready: images.iter().map(|i| i.ready).sum(),
            filling: images.iter().map(|i| i.filling).sum(),
            vcpus: self.cfg.default_vcpus,
            memory_mib: self.cfg.default_memory_mib,
            images,
        }
    }

    /// Memory promised to the pool: VMs waiting in it and refills under way (in the default shape).
    pub(crate) fn pool_promise_mib(&self) -> u64 {
        let pool = self.warm.pool.lock();
        let filling = self.warm.pool_filling.lock();
        pool_promise(&pool, &filling, self.cfg.default_memory_mib)
    }

    /// Takes a pooled VM of this image and shape, if one waits.
    pub(crate) fn take_pooled(&self, image_id: &str, vcpus: u32, memory_mib: u32) -> Option<PoolEntry> {
        let mut pool = self.warm.pool.lock();
        let i = pool.iter().position(|e| e.image_id == image_id && e.vcpus == vcpus && e.memory_mib == memory_mib)?;
        Some(pool.remove(i))
    }

    /// Ends every pooled VM (daemon shutdown, or the default image changed).
    pub(crate) async fn drain_pool(&self) {
        let entries: Vec<PoolEntry> = std::mem::take(&mut *self.warm.pool.lock());
        for e in entries {
            self.end_pooled(e).await;
        }
    }

    pub(super) async fn end_pooled(&self, e: PoolEntry) {
        e.conn.close();
        vmm::stop_vm_processes(&self.vm_paths(&e.id).dir, &e.id, Some(e.pid)).await;
        if let (Some(net), Some(tap)) = (self.network(), &e.tap) {
            net.release_tap(tap).await;
        }
        let _ = tokio::fs::remove_dir_all(self.vm_paths(&e.id).dir).await;
    }
}
