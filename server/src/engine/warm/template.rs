//! Templates: where they live, which one a VM may use, building one, restoring clones from it and giving each clone its own identity, and collecting old generations.
use super::*;

/// The generation a slot's `current` link names (a relative link to a sibling folder).
pub(super) fn current_generation(slot: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(slot.join("current")).ok()?;
    let dir = slot.join(target.file_name()?);
    dir.is_dir().then_some(dir)
}

impl Engine {
    pub(super) fn templates_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("templates")
    }

    /// Templates of one image and shape live together; each build is a generation of its own.
    pub(super) fn template_slot(
        &self,
        image_id: &str,
        vmm: VmmKind,
        vcpus: u32,
        memory_mib: u32,
        nic: bool,
    ) -> PathBuf {
        let net = if nic { "" } else { "-nonet" };
        let kind = self.driver(vmm).template_slot_suffix();
        self.templates_dir().join(format!("{image_id}-{vcpus}c-{memory_mib}m{net}{kind}"))
    }

    /// Where a Firecracker template's VMM saw its files (and where each clone's are mounted): outside the
    /// generation's folder, which is renamed when the build is published.
    pub(super) fn anchor_dir(&self, generation: &str) -> PathBuf {
        self.cfg.state_dir.join("template-anchors").join(generation)
    }

    pub(super) fn nic_enabled(&self) -> bool {
        self.cfg.network.enabled
    }

    pub(crate) fn template_inputs(
        &self,
        image: &ImageRow,
        vmm: VmmKind,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<TemplateInputs, String> {
        let driver = self.driver(vmm);
        let vmm_binary = driver.find_binary().ok_or(format!("{} is not installed", driver.binary()))?;
        let b = BuildInfo::current();
        Ok(TemplateInputs {
            format: TEMPLATE_FORMAT,
            banger: format!("{}+{}", b.version, b.commit),
            image_id: image.id.clone(),
            image_fingerprint: image.fingerprint.clone(),
            rootfs: FileStamp::of(Path::new(&image.rootfs))?,
            work_seed: (!image.work_seed.is_empty()).then(|| FileStamp::of(Path::new(&image.work_seed))).transpose()?,
            kernel: FileStamp::of(Path::new(&image.kernel))?,
            initrd: image.initrd.as_ref().map(|i| FileStamp::of(Path::new(i))).transpose()?,
            vmm: vmm.as_str().to_string(),
            vmm_binary: FileStamp::of(&vmm_binary)?,
            accel: driver.accel(),
            vcpus,
            memory_mib,
            nic: self.nic_enabled(),
        })
    }

    /// Why VMs of this kind can never be warm-started here, if so.
    pub(super) fn warm_unsupported(&self, vmm: VmmKind) -> Option<String> {
        if !self.cfg.warm.templates {
            return Some("warm starts are off (warm.templates = false)".into());
        }
        self.driver(vmm).template_unsupported()
    }

    /// The current template of this image and shape, or why there is none to use.
    pub(crate) fn find_template(
        &self,
        image: &ImageRow,
        vmm: VmmKind,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Template, TemplateMiss> {
        if let Some(why) = self.warm_unsupported(vmm) {
            return Err(TemplateMiss::Unsupported(why));
        }
        let now = self.template_inputs(image, vmm, vcpus, memory_mib).map_err(TemplateMiss::Inputs)?;
        let slot = self.template_slot(&image.id, vmm, vcpus, memory_mib, now.nic);
        let Some(dir) = current_generation(&slot) else {
            return Err(TemplateMiss::Missing);
        };
        let meta: TemplateMeta = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TemplateMiss::Unreadable)?;
        if let Some(why) = meta.inputs.stale_reason(&now) {
            return Err(TemplateMiss::Stale(why));
        }
        let t = Template { dir, meta };
        if let Ok(why) = std::fs::read_to_string(t.failed_marker()) {
            return Err(TemplateMiss::Failed(why.chars().take(300).collect()));
        }
        let ram_ok = std::fs::metadata(t.ram()).is_ok_and(|m| m.len() == memory_mib as u64 * 1024 * 1024);
        let state_ok = std::fs::metadata(t.state()).is_ok_and(|m| m.len() > 0);
        let driver = self.driver(vmm);
        let disk = match driver.template_layout() {
            vmm::RootLayout::Qcow2 => t.root_disk(),
            vmm::RootLayout::Overlay => t.dir.join("overlay.ext4"),
        };
        let anchor_ok = !driver.template_needs_anchor() || self.anchor_dir(&t.meta.generation).is_dir();
        if !ram_ok || !state_ok || !disk.is_file() || !anchor_ok {
            return Err(TemplateMiss::Incomplete);
        }
        Ok(t)
    }

    /// Decides how a new VM boots: warm from a valid template, else cold with the reason.
    pub(crate) fn boot_plan(&self, row: &VmRow, image: &ImageRow, cold_requested: bool) -> BootPlan {
        if cold_requested {
            return BootPlan::Cold { reason: Some("a cold boot was requested".into()) };
        }
        if let Some(why) = self.warm_unsupported(row.vmm) {
            return BootPlan::Cold { reason: Some(why) };
        }
        match self.find_template(image, row.vmm, row.vcpus, row.memory_mib) {
            Ok(t) => BootPlan::Warm(Box::new(t)),
            Err(miss) => BootPlan::Cold { reason: Some(miss.to_string()) },
        }
    }

    pub(super) fn slot_lock(&self, slot: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.warm.slot_locks.of(&slot.display().to_string())
    }

    pub async fn image_warm(self: &Arc<Self>, p: ImageWarmParams, ctx: CallContext) -> Result<TemplateInfo, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let image = self.resolve_image(p.image.as_deref()).await?;
        let vmm = self.vmm().vmm;
        if let Some(why) = self.warm_unsupported(vmm) {
            return Err(ApiError::precondition(format!("cannot make a template: {why}"))
                .with_hint("set warm.templates = true and qemu_channel = \"virtio-serial\" in the config"));
        }
        let vcpus = p.vcpus.unwrap_or(self.cfg.default_vcpus);
        let memory_mib = p.memory_mib.unwrap_or(self.cfg.default_memory_mib);
        self.ensure_template(&image, vmm, vcpus, memory_mib, p.rebuild.unwrap_or(false), &ctx.cancel).await
    }

    /// Returns the current template of the image and shape, building one if there is none or it is stale.
    pub(crate) async fn ensure_template(
        self: &Arc<Self>,
        image: &ImageRow,
        vmm: VmmKind,
        vcpus: u32,
        memory_mib: u32,
        rebuild: bool,
        cancel: &CancellationToken,
    ) -> Result<TemplateInfo, ApiError> {
        let inputs = self.template_inputs(image, vmm, vcpus, memory_mib).map_err(|e| {
            ApiError::precondition(format!("cannot make a template of image {}: {e}", image.name))
                .with_hint("check that the image's files and the VMM binary are present")
                .with_next("doctor.run", serde_json::json!({}), "checks the images and the VMM binaries")
        })?;
        let slot = self.template_slot(&image.id, vmm, vcpus, memory_mib, inputs.nic);
        let lock = self.slot_lock(&slot);
        let _held = lock.lock().await;
        let info = |t: &Template, reused: bool, replaced: Option<String>| TemplateInfo {
            image: image.name.clone(),
            vcpus,
            memory_mib,
            generation: t.meta.generation.clone(),
            created_at: t.meta.created_at,
            reused,
            build_ms: (!reused).then_some(t.meta.build_ms),
            replaced_because: replaced,
        };
        let previous = self.find_template(image, vmm, vcpus, memory_mib);
        let replaced = match previous {
            Ok(t) if !rebuild => return Ok(info(&t, true, None)),
            Ok(_) => Some("a rebuild was requested".to_string()),
            Err(failed @ TemplateMiss::Failed(_)) if !rebuild => return Err(ApiError::precondition(
                failed.to_string(),
            )
            .with_hint("new VMs boot cold meanwhile")
            .with_next(
                "image.warm",
                serde_json::json!({"image": image.name, "vcpus": vcpus, "memory_mib": memory_mib, "rebuild": true}),
                "makes a new template",
            )),
            Err(TemplateMiss::Missing) => None,
            Err(why) => Some(why.to_string()),
        };
        let t = self.build_template(image, vmm, inputs, &slot, cancel).await?;
        self.collect_templates().await;
        Ok(info(&t, false, replaced))
    }

    /// Boots the template guest, saves it once its agent answers, and makes it the slot's current generation.
    /// Nothing is left behind when it fails.
    pub(super) async fn build_template(
        &self,
        image: &ImageRow,
        vmm: VmmKind,
        inputs: TemplateInputs,
        slot: &Path,
        cancel: &CancellationToken,
    ) -> Result<Template, ApiError> {
        let started = Instant::now();
        let generation = new_id();
        let work = slot.join(format!("{generation}.tmp"));
        let vm_id = format!("tpl-{generation}");
        let paths = VmPaths::new(work.clone());
        let anchor = self.anchor_dir(&generation);
        tracing::info!(image = %image.name, vmm = vmm.as_str(), vcpus = inputs.vcpus, memory_mib = inputs.memory_mib, %generation, "building a warm-start template");
        let driver = self.driver(vmm);
        let mut pid = None;
        let mut tap = None;
        let result = async {
            std::fs::create_dir_all(&work).map_err(|e| {
                ApiError::internal(format!("creating {}: {e}", work.display()))
                    .with_hint(crate::engine::errors::hint::STATE_DIR)
            })?;
            let (root, seed) = (Path::new(&image.rootfs), Path::new(&image.work_seed));
            match driver.template_layout() {
                vmm::RootLayout::Qcow2 => {
                    vmm::create_overlay_disk(&self.cfg, root, "raw", &paths.root_disk()).await.map_err(vmm_error)?;
                    if !image.work_seed.is_empty() {
                        vmm::create_overlay_disk(&self.cfg, seed, "raw", &paths.work_disk())
                            .await
                            .map_err(vmm_error)?;
                    }
                }
                vmm::RootLayout::Overlay => self.make_raw_disks(image, &paths).await?,
            }
            // A NIC that needs a TAP even for a template (Firecracker): clones move theirs onto their own.
            if let (true, true, Some(net)) = (driver.template_needs_tap(), inputs.nic, self.network()) {
                tap = Some(net.acquire_tap().await.map_err(|e| {
                    ApiError::internal(format!("cannot get a TAP device: {e}"))
                        .with_hint("the host's TAP pool or bridge is not usable")
                        .with_next("doctor.run", serde_json::json!({}), "checks networking")
                })?);
            }
            let nic = tap.clone().map(|t| (t, super::pool::placeholder_net()));
            let memory = driver.template_memory(work.join("ram"));
            let mut spec = self.template_spec(image, &driver, &inputs, &paths, &vm_id, nic, memory);
            if driver.template_needs_anchor() {
                std::fs::create_dir_all(&anchor).map_err(|e| {
                    ApiError::internal(format!("creating {}: {e}", anchor.display()))
                        .with_hint(crate::engine::errors::hint::STATE_DIR)
                })?;
                spec.anchor = Some(anchor.clone());
            }
            // Last before the launch, which removes the cgroup whenever it fails.
            spec.contain = self.containment(&vm_id, inputs.vcpus, inputs.memory_mib).await?;
            let launched = driver.launch(&spec).await.map_err(vmm_error)?;
            pid = Some(launched.pid);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(self.cfg.boot_timeout_secs);
            // QEMU: the channel stays connected while the state is saved, so a clone that connects before it
            // resumes finds the port exactly as the agent left it.
            let (conn, _) = paths
                .guest_channel()
                .ready(deadline, cancel)
                .await
                .map_err(|e| guest_error(&format!("template {generation}"), e))?;
            let saved = vmm::Snapshot { state: work.join("state"), ram: work.join("ram"), anchor: None };
            driver.save_template(&work, launched.pid, &saved).await.map_err(vmm_error)?;
            conn.close();
            Ok::<(), ApiError>(())
        }
        .await;
        if let Some(pid) = pid {
            vmm::stop_vm_processes(&work, &vm_id, Some(pid)).await;
        }
        if let (Some(net), Some(tap)) = (self.network(), tap) {
            net.release_tap(&tap).await;
        }
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&work).await;
            let _ = tokio::fs::remove_dir(&anchor).await;
            return Err(if cancel.is_cancelled() {
                ApiError::new(ErrorCode::Cancelled, "the template build was cancelled; nothing was kept")
                    .with_hint("new VMs boot cold meanwhile")
                    .with_next("image.warm", serde_json::json!({"image": image.name}), "builds the template again")
            } else {
                ApiError::internal(format!("building the template of image {} failed: {}", image.name, e.message))
                    .with_hint(
                        "new VMs boot cold meanwhile; a template's console log is not kept: the daemon log has details",
                    )
            });
        }
        for runtime in [paths.channel(), paths.control(), paths.pidfile(), paths.vsock()] {
            let _ = std::fs::remove_file(runtime);
        }
        let meta = TemplateMeta {
            inputs,
            generation: generation.clone(),
            created_at: now(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        let publish = || -> std::io::Result<PathBuf> {
            crate::vmm::host_files::write_fresh(
                &work.join("meta.json"),
                &serde_json::to_vec_pretty(&meta).expect("json"),
            )?;
            let dir = slot.join(&generation);
            std::fs::rename(&work, &dir)?;
            // Switch `current` atomically: a concurrent create sees the old generation or the new one.
            let link = slot.join(format!(".current-{generation}"));
            std::os::unix::fs::symlink(&generation, &link)?;
            std::fs::rename(&link, slot.join("current"))?;
            Ok(dir)
        };
        let dir = publish().map_err(|e| {
            let _ = std::fs::remove_dir_all(&work);
            ApiError::internal(format!("saving the template: {e}")).with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
        if matches!(driver, vmm::Driver::Qemu(_)) {
            // The sealed copy clones map (`sealed_ram`), made now so the first clone does not wait for it; a
            // failure here is the first clone's to report.
            let ram = dir.join("ram");
            let sealed = tokio::task::spawn_blocking(move || vmm::sealed_ram::sealed(&ram)).await;
            if let Ok(Err(e)) = sealed {
                tracing::warn!(%generation, error = %e, "sealing the template's RAM");
            }
        }
        tracing::info!(image = %image.name, %generation, build_ms = meta.build_ms, "warm-start template ready");
        Ok(Template { dir, meta })
    }

    /// The boot spec of a template and of its clones: the same device set, so a clone can load the template's
    /// device state. Only the RAM mapping, the NIC's backend and the file paths differ.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn template_spec(
        &self,
        image: &ImageRow,
        driver: &vmm::Driver,
        inputs: &TemplateInputs,
        paths: &VmPaths,
        vm_id: &str,
        tap: Option<(String, crate::network::GuestNet)>,
        memory: GuestMemory,
    ) -> BootSpec {
        BootSpec {
            vm_id: vm_id.to_string(),
            hostname: "banger-template".into(),
            vcpus: inputs.vcpus,
            memory_mib: inputs.memory_mib,
            kernel: image.kernel.clone().into(),
            initrd: image.initrd.clone().map(Into::into),
            kernel_elf: image.kernel_elf.clone().map(Into::into),
            // Firecracker takes raw disks only: its templates use the overlay layout.
            layout: driver.template_layout(),
            drives: driver.template_layout().drives(paths, Path::new(&image.rootfs), !image.work_seed.is_empty()),
            dir: paths.dir.clone(),
            net: tap,
            args: tools_schema::boot::BootArgs { template: true, ..Default::default() },
            vsock: false,
            memory,
            template_mac: inputs.nic.then(|| vmm::TEMPLATE_MAC.to_string()),
            anchor: None,
            contain: None,
        }
    }

    /// Creates a clone's disks. QEMU: qcow2 overlays over the template's (nothing is copied). Firecracker,
    /// which takes raw disks only: sparse copies (reflinks where the filesystem can) of the template's
    /// overlay and work disks; the image's base is shared read-only.
    pub(crate) async fn clone_disks(&self, t: &Template, paths: &VmPaths) -> Result<(), ApiError> {
        if self.driver(t.vmm()).template_layout() == vmm::RootLayout::Overlay {
            let copies =
                [(t.dir.join("overlay.ext4"), paths.overlay_disk()), (t.dir.join("work.ext4"), paths.work_disk_raw())];
            for (from, to) in copies.iter().filter(|(from, _)| from.is_file()) {
                crate::engine::disks::copy_writable(from, to).await?;
            }
            return Ok(());
        }
        let (base, disk) = (t.root_disk(), paths.root_disk());
        let root = vmm::create_overlay_disk(&self.cfg, &base, "qcow2", &disk);
        let with_work = t.work_disk().is_file();
        let work = async {
            if with_work {
                vmm::create_overlay_disk(&self.cfg, &t.work_disk(), "qcow2", &paths.work_disk()).await
            } else {
                Ok(())
            }
        };
        let (a, b) = tokio::join!(root, work);
        a.and(b).map_err(vmm_error)
    }

    /// Starts a clone's VMM from the template, resumes it and gives it `identity`. Returns the VMM's pid and
    /// the connected channel. On failure nothing of the clone runs any more, and a template that failed to
    /// restore (not a cancelled restore) is marked failed: it is not tried again until its inputs change.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn restore_clone(
        &self,
        image: &ImageRow,
        t: &Template,
        vm_id: &str,
        paths: &VmPaths,
        tap: Option<(String, crate::network::GuestNet)>,
        identity: CloneIdentity,
        cancel: &CancellationToken,
    ) -> Result<(u32, Arc<GuestConn>), ApiError> {
        let restored = self.restore_clone_once(image, t, vm_id, paths, tap, identity, cancel).await;
        if let Err(e) = &restored {
            if !cancel.is_cancelled() && e.code != ErrorCode::Cancelled {
                t.mark_failed(&e.message);
            }
        }
        restored
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn restore_clone_once(
        &self,
        image: &ImageRow,
        t: &Template,
        vm_id: &str,
        paths: &VmPaths,
        tap: Option<(String, crate::network::GuestNet)>,
        identity: CloneIdentity,
        cancel: &CancellationToken,
    ) -> Result<(u32, Arc<GuestConn>), ApiError> {
        let driver = self.driver(t.vmm());
        let mut spec =
            self.template_spec(image, &driver, &t.meta.inputs, paths, vm_id, tap, GuestMemory::CloneOf(t.ram()));
        spec.contain = self.containment(vm_id, t.meta.inputs.vcpus, t.meta.inputs.memory_mib).await?;
        let anchor = driver.template_needs_anchor().then(|| self.anchor_dir(&t.meta.generation));
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (launched, conn) =
            driver.restore(&spec, &t.snapshot(anchor), deadline, cancel).await.map_err(|e| match e {
                vmm::VmmError::Guest(e) => guest_error(vm_id, e),
                e => vmm_error(e),
            })?;
        // The identity is the first request the resumed agent reads (no Hello first: the template's agent
        // answered one before the snapshot), and its answer says the clone is ready.
        let identified = tokio::select! {
            r = self.send_identity(vm_id, &conn, identity) => r,
            _ = cancel.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "cancelled").with_hint(crate::engine::errors::hint::RUN_AGAIN)),
        };
        match identified {
            Ok(()) => {
                tracing::debug!(vm = vm_id, identified_ms = started.elapsed().as_millis() as u64, "clone identified");
                Ok((launched.pid, conn))
            }
            Err(e) => {
                conn.close();
                driver.kill(&paths.dir, vm_id, Some(launched.pid)).await;
                Err(e)
            }
        }
    }

    /// Gives a restored clone its own identity. Fresh entropy comes from the host's RNG.
    pub(crate) async fn reidentify(&self, row: &VmRow, conn: &GuestConn) -> Result<(), ApiError> {
        let identity = self.clone_identity(row);
        self.send_identity(&row.name, conn, identity).await
    }

    /// A VM's own identity, for a clone restored from a template. Fresh entropy comes from the host's RNG.
    pub(crate) fn clone_identity(&self, row: &VmRow) -> CloneIdentity {
        let net = match (self.network(), row.ip, &row.mac) {
            (Some(net), Some(ip), Some(mac)) => {
                let g = net.guest_net(ip, mac);
                Some(GuestNetConfig {
                    address: format!("{}/{}", g.ip, g.prefix),
                    gateway: g.gateway.to_string(),
                    dns: g.gateway.to_string(),
                    mac: g.mac.clone(),
                })
            }
            _ => None,
        };
        let entropy: [u8; 64] = rand::random();
        CloneIdentity {
            hostname: row.name.clone(),
            net,
            ssh_authorized_key: self.ssh_public_key(),
            entropy_hex: hex::encode(entropy),
            unix_time_ns: self.clone_identity_time(),
            rehearsal: false,
        }
    }

    pub(super) fn clone_identity_time(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }

    pub(super) async fn send_identity(
        &self,
        vm: &str,
        conn: &GuestConn,
        identity: CloneIdentity,
    ) -> Result<(), ApiError> {
        match conn
            .request(&GuestRequest::Reidentify(identity), Duration::from_secs(30), &CancellationToken::new())
            .await
        {
            Ok(GuestResponse::Ok) => Ok(()),
            Err(crate::guest::GuestError::Agent { message, .. }) => {
                Err(ApiError::internal(format!("VM {vm}'s agent could not take its own identity: {message}"))
                    .with_hint("the VM boots cold instead")
                    .with_next(
                        "image.warm",
                        serde_json::json!({"image": "<the VM's image>", "rebuild": true}),
                        "makes a new template",
                    ))
            }
            Ok(other) => Err(ApiError::internal(format!(
                "unexpected answer to reidentify: {}",
                crate::guest::untrusted_text(&format!("{other:?}"))
            ))
            .with_hint("the VM boots cold instead")
            .with_next(
                "image.warm",
                serde_json::json!({"image": "<the VM's image>", "rebuild": true}),
                "makes a new template",
            )),
            Err(e) => Err(guest_error(vm, e)),
        }
    }

    /// After a cold boot that found no usable template: build one in the background, once per slot.
    pub(crate) fn build_template_later(self: &Arc<Self>, image: ImageRow, vmm: VmmKind, vcpus: u32, memory_mib: u32) {
        if !self.cfg.warm.auto_build || self.warm_unsupported(vmm).is_some() {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let cancel = CancellationToken::new();
            if let Err(e) = engine.ensure_template(&image, vmm, vcpus, memory_mib, false, &cancel).await {
                tracing::warn!(image = %image.name, error = %e.message, "background template build failed");
            }
        });
    }

    /// Removes template generations that are neither current nor the base of a VM's disks, and build
    /// leftovers (`*.tmp`) of a daemon that died mid-build, with their VMM.
    pub(crate) async fn collect_templates(&self) {
        let root = self.templates_dir();
        let Ok(slots) = std::fs::read_dir(&root) else { return };
        let mut in_use = std::collections::HashSet::new();
        if let Ok(vms) = std::fs::read_dir(self.cfg.vms_dir()) {
            for vm in vms.flatten() {
                for disk in ["root.qcow2", "work.qcow2"] {
                    if let Some(b) = vmm::qcow2_backing_file(&vm.path().join(disk)) {
                        if let Some(gen_dir) = b.parent() {
                            in_use.insert(gen_dir.to_path_buf());
                        }
                    }
                }
            }
        }
        let Ok(images) = self.store.images().await else { return };
        let images: Vec<String> = images.into_iter().map(|i| i.id).collect();
        for slot in slots.flatten() {
            let slot_name = slot.file_name().to_string_lossy().to_string();
            let image_id = slot_name.split('-').next().unwrap_or_default();
            // The image is gone (its VMs went first): so is every template of it.
            let image_gone = !images.iter().any(|i| i == image_id);
            let current = current_generation(&slot.path()).filter(|_| !image_gone);
            let Ok(gens) = std::fs::read_dir(slot.path()) else { continue };
            for g in gens.flatten() {
                let path = g.path();
                let name = g.file_name().to_string_lossy().to_string();
                if name == "current" || name.starts_with(".current-") || !path.is_dir() {
                    continue;
                }
                if let Some(generation) = name.strip_suffix(".tmp") {
                    // A build in progress holds its slot lock; only a dead daemon's builds are left over.
                    let lock = self.slot_lock(&slot.path());
                    let Ok(_held) = lock.try_lock() else { continue };
                    let vm_id = format!("tpl-{generation}");
                    let pid = std::fs::read_to_string(path.join("vmm.pid")).ok().and_then(|s| s.trim().parse().ok());
                    vmm::stop_vm_processes(&path, &vm_id, pid).await;
                    let _ = tokio::fs::remove_dir_all(&path).await;
                    continue;
                }
                if Some(&path) == current.as_ref() {
                    continue;
                }
                // No new clone comes from a generation that is not current: its sealed RAM can go.
                vmm::sealed_ram::forget(&path.join("ram"));
                if in_use.contains(&path) {
                    continue;
                }
                tracing::info!(template = %path.display(), "removing an unused template generation");
                let _ = tokio::fs::remove_dir_all(&path).await;
            }
            if image_gone && !in_use.iter().any(|g| g.starts_with(slot.path())) {
                let _ = tokio::fs::remove_dir_all(slot.path()).await;
            }
        }
        // A Firecracker generation's anchor goes with it (a running clone keeps its mount regardless).
        if let Ok(anchors) = std::fs::read_dir(self.cfg.state_dir.join("template-anchors")) {
            let live: std::collections::HashSet<String> = std::fs::read_dir(&root)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|slot| std::fs::read_dir(slot.path()).ok())
                .flatten()
                .flatten()
                .map(|g| g.file_name().to_string_lossy().trim_end_matches(".tmp").to_string())
                .collect();
            for a in anchors.flatten() {
                if !live.contains(a.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_dir(a.path());
                }
            }
        }
    }
}
