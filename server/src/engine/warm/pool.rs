//! The warm pool: restored VMs waiting to be handed out, refilled in the background within host memory.
use super::*;

/// The pooled VMs waiting to be handed out, and the refills under way, by image.
#[derive(Default)]
pub(crate) struct Pool {
    state: parking_lot::Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    ready: Vec<PoolEntry>,
    /// Pool entries being restored right now (counted against the pool size), by image id.
    filling: HashMap<String, usize>,
}

impl PoolState {
    /// Memory promised to the pool: VMs waiting in it, and refills under way at `fill_memory_mib` each.
    fn promise_mib(&self, fill_memory_mib: u32) -> u64 {
        self.ready.iter().map(|e| e.memory_mib as u64).sum::<u64>()
            + self.filling.values().sum::<usize>() as u64 * fill_memory_mib as u64
    }
}

impl Pool {
    /// Takes a pooled VM of this image and shape, if one waits.
    pub(crate) fn take(&self, image_id: &str, vcpus: u32, memory_mib: u32) -> Option<PoolEntry> {
        let mut state = self.state.lock();
        let i = state
            .ready
            .iter()
            .position(|e| e.image_id == image_id && e.vcpus == vcpus && e.memory_mib == memory_mib)?;
        Some(state.ready.remove(i))
    }

    /// A taken VM the create could not use after all.
    pub(crate) fn put_back(&self, entry: PoolEntry) {
        self.state.lock().ready.push(entry);
    }

    /// Takes every pooled VM out (to be ended).
    fn drain(&self) -> Vec<PoolEntry> {
        std::mem::take(&mut self.state.lock().ready)
    }

    /// Takes out the pooled VMs of images no longer pooled.
    fn remove_unless(&self, keep: impl Fn(&PoolEntry) -> bool) -> Vec<PoolEntry> {
        let mut state = self.state.lock();
        let (kept, gone) = std::mem::take(&mut state.ready).into_iter().partition(|e| keep(e));
        state.ready = kept;
        gone
    }

    /// Starts one refill of `image_id` unless the pool has (or is making) `size` of them already (`Ok(false)`),
    /// or `admit`, given the memory the pool holds now, refuses. Checked and counted under one lock.
    fn begin_fill<E>(
        &self,
        image_id: &str,
        size: usize,
        fill_memory_mib: u32,
        admit: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut state = self.state.lock();
        let have = state.ready.iter().filter(|e| e.image_id == image_id).count()
            + state.filling.get(image_id).copied().unwrap_or(0);
        if have >= size {
            return Ok(false);
        }
        admit(state.promise_mib(fill_memory_mib))?;
        *state.filling.entry(image_id.to_string()).or_default() += 1;
        Ok(true)
    }

    /// A refill begun by `begin_fill` ended, with its VM if it made one.
    fn end_fill(&self, image_id: &str, made: Option<PoolEntry>) {
        let mut state = self.state.lock();
        if let Some(n) = state.filling.get_mut(image_id) {
            *n = n.saturating_sub(1);
        }
        state.ready.extend(made);
    }

    /// Memory promised to the pool (refills in `fill_memory_mib`).
    pub(crate) fn promise_mib(&self, fill_memory_mib: u32) -> u64 {
        self.state.lock().promise_mib(fill_memory_mib)
    }

    /// (ready, filling) for one image.
    fn counts(&self, image_id: &str) -> (usize, usize) {
        let state = self.state.lock();
        (
            state.ready.iter().filter(|e| e.image_id == image_id).count(),
            state.filling.get(image_id).copied().unwrap_or(0),
        )
    }
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
        let stale = self.warm.pool.remove_unless(|e| targets.iter().any(|(i, _)| i.id == e.image_id));
        for e in stale {
            self.end_pooled(e).await;
        }
        for (image, size) in targets {
            loop {
                {
                    // A refill is promised its memory like a create, under the same lock (admission.rs).
                    let _alloc = self.admission.allocating().await;
                    let rows = self.store.vms().await?;
                    let host = crate::engine::admission::HostCapacity::read();
                    let available = host.available_mib;
                    let begun = self.warm.pool.begin_fill(&image.id, size, memory_mib, |pool_promise| {
                        if available < memory_mib as u64 + self.cfg.warm.pool_reserve_mib {
                            tracing::info!(available_mib = available, "warm pool not refilled: host memory is short");
                            return Err(());
                        }
                        let promised = crate::engine::admission::recorded_promise_mib(&rows) + pool_promise;
                        let budget = crate::engine::admission::memory_budget_mib(&self.cfg.limits, &host);
                        crate::engine::admission::admit("a pooled VM", memory_mib as u64, promised, budget).map_err(
                            |e| tracing::info!(reason = %e.message, "warm pool not refilled: the memory budget is spent"),
                        )
                    });
                    match begun {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(()) => return Ok(()),
                    }
                }
                // Restores are boots: they take their turn with creates.
                let slot = self.admission.slots.acquire(&CancellationToken::new(), |_| {}).await;
                let entry = self.pool_entry(&image, vcpus, memory_mib).await;
                drop(slot);
                match entry {
                    Ok(entry) => self.warm.pool.end_fill(&image.id, Some(entry)),
                    Err(e) => {
                        self.warm.pool.end_fill(&image.id, None);
                        return Err(e);
                    }
                }
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
                    ApiError::internal(miss.to_string()).with_hint("the pool refills later by itself").with_next(
                        "image.warm",
                        serde_json::json!({"image": image.name, "rebuild": true}),
                        "makes the template anew",
                    )
                })?
            }
        };
        let id = new_id();
        let paths = self.vm_paths(&id);
        // Before `result`: a directory that exists is another VM's, and a failure must not remove it.
        crate::engine::disks::create_vm_dir(&paths.dir).await?;
        let result = async {
            self.clone_disks(&t, &paths).await?;
            let tap = match self.network() {
                Some(net) if t.meta.inputs.nic => Some(net.acquire_tap().await.map_err(|e| {
                    ApiError::internal(format!("cannot get a TAP device: {e}"))
                        .with_hint("the host's TAP pool or bridge is not usable")
                        .with_next("doctor.run", serde_json::json!({}), "checks networking")
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
        let images = targets
            .iter()
            .map(|(image, size)| {
                let (ready, filling) = self.warm.pool.counts(&image.id);
                tools_schema::daemon::WarmPoolImage {
                    image: image.name.clone(),
                    size: *size as u32,
                    ready: ready as u32,
                    filling: filling as u32,
                }
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
        self.warm.pool.promise_mib(self.cfg.default_memory_mib)
    }

    /// Ends every pooled VM (daemon shutdown, or the default image changed).
    pub(crate) async fn drain_pool(&self) {
        for e in self.warm.pool.drain() {
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
