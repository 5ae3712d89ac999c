//! Warm starts: per-image template snapshots, clones restored from them, and the warm pool (QEMU).
//!
//! A template is one guest of an image and shape (vcpus, memory), booted once with `banger.template=1`
//! (no SSH, no network settings), saved as soon as its agent answers: guest RAM in a file the template
//! keeps (`ram`, written through a shared mapping), the device state (`state`, tens of KiB, `x-ignore-shared`
//! leaves RAM out), and its two qcow2 disks, frozen from then on. A clone is a new QEMU with the template's
//! exact device set, its RAM file mapped copy-on-write, `-incoming defer`, and disks that are qcow2 overlays
//! over the template's. Once resumed, the agent gets `Reidentify` (clock, RNG reseed, hostname, MAC and
//! address, SSH host key) before the VM is handed out.
//!
//! A template is valid only for the exact inputs it was made from (`TemplateInputs`): image files, kernel,
//! initramfs, QEMU binary, acceleration, banger build, shape. Anything else is refused with the reason, the VM
//! boots cold, and a new template is built. Old generations stay on disk while a VM's disks are overlays of
//! them (a clone cold-boots from them after a stop), and are removed after that.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::VmmKind;
use tools_schema::guest::{CloneIdentity, GuestNetConfig, GuestRequest, GuestResponse};
use tools_schema::image::{ImageWarmParams, TemplateInfo};
use tools_schema::{ApiError, BuildInfo, ErrorCode};

use super::vm::{guest_error, vmm_error};
use super::{new_id, now, CallContext, Engine};
use crate::guest::GuestConn;
use crate::store::{ImageRow, VmRow};
use crate::vmm::{self, BootSpec, GuestMemory, VmPaths};

/// Bumped whenever what a template holds or how it is restored changes: older templates are then stale.
const TEMPLATE_FORMAT: u32 = 1;
/// How find_template's reason starts for a template whose restore failed.
pub(crate) const TEMPLATE_FAILED: &str = "the template is marked failed";

/// A file as a template saw it: replacing or touching it makes templates made from it stale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileStamp {
    path: String,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> Result<FileStamp, String> {
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::MetadataExt;
        Ok(FileStamp {
            path: path.display().to_string(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

/// Everything a template depends on. A template is restored only when all of it is unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TemplateInputs {
    format: u32,
    banger: String,
    image_id: String,
    image_fingerprint: String,
    rootfs: FileStamp,
    work_seed: Option<FileStamp>,
    kernel: FileStamp,
    initrd: Option<FileStamp>,
    /// `qemu` or `firecracker`, and its binary.
    vmm: String,
    vmm_binary: FileStamp,
    accel: String,
    vcpus: u32,
    memory_mib: u32,
    nic: bool,
}

impl TemplateInputs {
    /// Why a template made from `self` cannot serve `now`, or None when it can.
    fn stale_reason(&self, now: &TemplateInputs) -> Option<String> {
        Some(if self.format != now.format {
            "the template format changed".into()
        } else if self.banger != now.banger {
            format!("banger's version changed ({} -> {})", self.banger, now.banger)
        } else if self.image_id != now.image_id
            || self.image_fingerprint != now.image_fingerprint
            || self.rootfs != now.rootfs
            || self.work_seed != now.work_seed
        {
            "the image changed".into()
        } else if self.kernel != now.kernel || self.initrd != now.initrd {
            "the image's kernel changed".into()
        } else if self.vmm != now.vmm || self.vmm_binary != now.vmm_binary || self.accel != now.accel {
            format!("the VMM changed ({})", now.vmm)
        } else if (self.vcpus, self.memory_mib, self.nic) != (now.vcpus, now.memory_mib, now.nic) {
            "the template has another shape".into()
        } else {
            return None;
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TemplateMeta {
    inputs: TemplateInputs,
    generation: String,
    created_at: i64,
    build_ms: u64,
}

/// A usable template generation.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    dir: PathBuf,
    meta: TemplateMeta,
}

impl Template {
    fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub(crate) fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    pub(crate) fn work_disk(&self) -> PathBuf {
        self.dir.join("work.qcow2")
    }
    pub(crate) fn generation(&self) -> &str {
        &self.meta.generation
    }
    /// Where a failed restore is recorded, with its reason: a template generation is keyed by its inputs, so
    /// a marked one is never restored or rebuilt again; a change of inputs makes a new generation.
    fn failed_marker(&self) -> PathBuf {
        self.dir.join("restore-failed")
    }
    fn mark_failed(&self, why: &str) {
        tracing::warn!(template = %self.meta.generation, error = %why, "template restore failed; marked failed");
        let _ = std::fs::write(self.failed_marker(), why);
    }
    /// The VMM the template was made on (written by `template_inputs`; anything unknown is QEMU's, as before
    /// the field named Firecracker).
    fn vmm(&self) -> VmmKind {
        self.meta.inputs.vmm.parse().unwrap_or(VmmKind::Qemu)
    }
    fn snapshot(&self, anchor: Option<PathBuf>) -> vmm::Snapshot {
        vmm::Snapshot { state: self.state(), ram: self.ram(), anchor }
    }
}

/// A restored VM waiting in the warm pool: its VMM runs, its channel is connected, it has the template's
/// identity until it is handed out. Its directory is already `<vms>/<id>`, with no record: a daemon that
/// dies removes it like any orphan.
pub(crate) struct PoolEntry {
    pub(crate) id: String,
    pub(crate) image_id: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) pid: u32,
    pub(crate) tap: Option<String>,
    pub(crate) conn: Arc<GuestConn>,
}

/// Warm-start state kept by the engine.
#[derive(Default)]
pub(crate) struct Warm {
    /// One build at a time per template slot.
    slot_locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) pool: parking_lot::Mutex<Vec<PoolEntry>>,
    /// Pool entries being restored right now (counted against the pool size).
    pool_filling: parking_lot::Mutex<HashMap<String, usize>>,
}

/// Where a VM's boot comes from.
pub(crate) enum BootPlan {
    Cold { reason: Option<String> },
    Warm(Box<Template>),
}

impl Engine {
    fn templates_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("templates")
    }

    /// Templates of one image and shape live together; each build is a generation of its own.
    fn template_slot(&self, image_id: &str, vmm: VmmKind, vcpus: u32, memory_mib: u32, nic: bool) -> PathBuf {
        let net = if nic { "" } else { "-nonet" };
        let kind = self.driver(vmm).template_slot_suffix();
        self.templates_dir().join(format!("{image_id}-{vcpus}c-{memory_mib}m{net}{kind}"))
    }

    /// Where a Firecracker template's VMM saw its files (and where each clone's are mounted): outside the
    /// generation's folder, which is renamed when the build is published.
    fn anchor_dir(&self, generation: &str) -> PathBuf {
        self.cfg.state_dir.join("template-anchors").join(generation)
    }

    fn nic_enabled(&self) -> bool {
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
            accel: driver.accel().to_string(),
            vcpus,
            memory_mib,
            nic: self.nic_enabled(),
        })
    }

    /// Why VMs of this kind can never be warm-started here, if so.
    fn warm_unsupported(&self, vmm: VmmKind) -> Option<String> {
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
    ) -> Result<Template, String> {
        if let Some(why) = self.warm_unsupported(vmm) {
            return Err(why);
        }
        let now = self.template_inputs(image, vmm, vcpus, memory_mib)?;
        let slot = self.template_slot(&image.id, vmm, vcpus, memory_mib, now.nic);
        let Some(dir) = current_generation(&slot) else {
            return Err("no template for this image and shape yet".into());
        };
        let meta: TemplateMeta = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("the template's metadata is unreadable")?;
        if let Some(why) = meta.inputs.stale_reason(&now) {
            return Err(format!("the template is stale: {why}"));
        }
        let t = Template { dir, meta };
        if let Ok(why) = std::fs::read_to_string(t.failed_marker()) {
            let why: String = why.chars().take(300).collect();
            return Err(format!(
                "{TEMPLATE_FAILED}: restoring it failed ({why}); it is tried again when the image, kernel, VMM or \
                 banger changes, or after `banger image warm --rebuild`"
            ));
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
            return Err("the template's files are incomplete".into());
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
            Err(reason) => BootPlan::Cold { reason: Some(reason) },
        }
    }

    fn slot_lock(&self, slot: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.warm.slot_locks.lock();
        locks.entry(slot.display().to_string()).or_default().clone()
    }

    pub async fn image_warm(self: &Arc<Self>, p: ImageWarmParams, ctx: CallContext) -> Result<TemplateInfo, ApiError> {
        p.validate().map_err(ApiError::invalid)?;
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
        let inputs = self
            .template_inputs(image, vmm, vcpus, memory_mib)
            .map_err(|e| ApiError::precondition(format!("cannot make a template of image {}: {e}", image.name)))?;
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
            Err(why) if why.starts_with(TEMPLATE_FAILED) && !rebuild => {
                return Err(ApiError::precondition(why)
                    .with_hint("`banger image warm --rebuild` makes a new template; new VMs boot cold meanwhile"))
            }
            Err(why) if why.starts_with("no template") => None,
            Err(why) => Some(why),
        };
        let t = self.build_template(image, vmm, inputs, &slot, cancel).await?;
        self.collect_templates().await;
        Ok(info(&t, false, replaced))
    }

    /// Boots the template guest, saves it once its agent answers, and makes it the slot's current generation.
    /// Nothing is left behind when it fails.
    async fn build_template(
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
            std::fs::create_dir_all(&work)
                .map_err(|e| ApiError::internal(format!("creating {}: {e}", work.display())))?;
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
                tap = Some(
                    net.acquire_tap().await.map_err(|e| ApiError::internal(format!("cannot get a TAP device: {e}")))?,
                );
            }
            let nic = tap.clone().map(|t| (t, placeholder_net()));
            let memory = driver.template_memory(work.join("ram"));
            let mut spec = self.template_spec(image, &driver, &inputs, &paths, &vm_id, nic, memory);
            if driver.template_needs_anchor() {
                std::fs::create_dir_all(&anchor)
                    .map_err(|e| ApiError::internal(format!("creating {}: {e}", anchor.display())))?;
                spec.anchor = Some(anchor.clone());
            }
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
            } else {
                ApiError::internal(format!("building the template of image {} failed: {}", image.name, e.message))
                    .with_hint(
                        "new VMs boot cold meanwhile; `banger vm logs` is not kept for templates, see the daemon log",
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
            std::fs::write(work.join("meta.json"), serde_json::to_vec_pretty(&meta).expect("json"))?;
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
            ApiError::internal(format!("saving the template: {e}"))
        })?;
        tracing::info!(image = %image.name, %generation, build_ms = meta.build_ms, "warm-start template ready");
        Ok(Template { dir, meta })
    }

    /// The boot spec of a template and of its clones: the same device set, so a clone can load the template's
    /// device state. Only the RAM mapping, the NIC's backend and the file paths differ.
    #[allow(clippy::too_many_arguments)]
    fn template_spec(
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
            extra_args: vec!["banger.template=1".into()],
            vsock: false,
            memory,
            template_mac: inputs.nic.then(|| vmm::TEMPLATE_MAC.to_string()),
            anchor: None,
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
                super::vm::copy_writable(from, to).await?;
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
    async fn restore_clone_once(
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
        let spec = self.template_spec(image, &driver, &t.meta.inputs, paths, vm_id, tap, GuestMemory::CloneOf(t.ram()));
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
            _ = cancel.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "cancelled")),
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
            ssh_authorized_key: std::fs::read_to_string(self.cfg.ssh_key().with_extension("pub"))
                .ok()
                .map(|k| k.trim().to_string()),
            entropy_hex: hex::encode(entropy),
            unix_time_ns: self.clone_identity_time(),
            rehearsal: false,
        }
    }

    fn clone_identity_time(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }

    async fn send_identity(&self, vm: &str, conn: &GuestConn, identity: CloneIdentity) -> Result<(), ApiError> {
        match conn
            .request(&GuestRequest::Reidentify(identity), Duration::from_secs(30), &CancellationToken::new())
            .await
        {
            Ok(GuestResponse::Ok) => Ok(()),
            Ok(GuestResponse::Error { message }) => {
                Err(ApiError::internal(format!("VM {vm}'s agent could not take its own identity: {message}")))
            }
            Ok(other) => Err(ApiError::internal(format!("unexpected answer to reidentify: {other:?}"))),
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
                if Some(&path) == current.as_ref() || in_use.contains(&path) {
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
    async fn pool_targets(&self) -> Result<Vec<(ImageRow, usize)>, ApiError> {
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

    async fn refill_pool(self: &Arc<Self>) -> Result<(), ApiError> {
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
                    let available = available_memory_mib().unwrap_or(0);
                    if available < memory_mib as u64 + self.cfg.warm.pool_reserve_mib {
                        tracing::info!(available_mib = available, "warm pool not refilled: host memory is short");
                        return Ok(());
                    }
                    let promised =
                        super::admission::recorded_promise_mib(&rows) + pool_promise(&pool, &filling, memory_mib);
                    let budget =
                        super::admission::memory_budget_mib(&self.cfg.limits, &super::admission::HostCapacity::read());
                    if let Err(e) = super::admission::admit("a pooled VM", memory_mib as u64, promised, budget) {
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
    async fn pool_entry(
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
                self.find_template(image, vmm, vcpus, memory_mib).map_err(ApiError::internal)?
            }
        };
        let id = new_id();
        let paths = self.vm_paths(&id);
        // Before `result`: a directory that exists is another VM's, and a failure must not remove it.
        super::vm::create_vm_dir(&paths.dir).await?;
        let result = async {
            self.clone_disks(&t, &paths).await?;
            let tap = match self.network() {
                Some(net) if t.meta.inputs.nic => Some(
                    net.acquire_tap().await.map_err(|e| ApiError::internal(format!("cannot get a TAP device: {e}")))?,
                ),
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

    async fn end_pooled(&self, e: PoolEntry) {
        e.conn.close();
        vmm::stop_vm_processes(&self.vm_paths(&e.id).dir, &e.id, Some(e.pid)).await;
        if let (Some(net), Some(tap)) = (self.network(), &e.tap) {
            net.release_tap(tap).await;
        }
        let _ = tokio::fs::remove_dir_all(self.vm_paths(&e.id).dir).await;
    }
}

fn pool_promise(pool: &[PoolEntry], filling: &HashMap<String, usize>, fill_memory_mib: u32) -> u64 {
    pool.iter().map(|e| e.memory_mib as u64).sum::<u64>()
        + filling.values().sum::<usize>() as u64 * fill_memory_mib as u64
}

/// The NIC settings of a VM whose real ones arrive with `Reidentify` (templates, pooled VMs): never in a
/// guest, since a template's command line carries none.
fn placeholder_net() -> crate::network::GuestNet {
    crate::network::GuestNet {
        ip: std::net::Ipv4Addr::UNSPECIFIED,
        prefix: 32,
        gateway: std::net::Ipv4Addr::UNSPECIFIED,
        mac: vmm::TEMPLATE_MAC.into(),
    }
}

/// The generation a slot's `current` link names (a relative link to a sibling folder).
fn current_generation(slot: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(slot.join("current")).ok()?;
    let dir = slot.join(target.file_name()?);
    dir.is_dir().then_some(dir)
}

/// MemAvailable from /proc/meminfo, in MiB.
fn available_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> TemplateInputs {
        let f = |p: &str| FileStamp { path: p.into(), size: 1, mtime_ns: 1 };
        TemplateInputs {
            format: TEMPLATE_FORMAT,
            banger: "0.1.0+abc".into(),
            image_id: "img".into(),
            image_fingerprint: "fp".into(),
            rootfs: f("/r"),
            work_seed: Some(f("/w")),
            kernel: f("/k"),
            initrd: None,
            vmm: "qemu".into(),
            vmm_binary: f("/q"),
            accel: "tcg".into(),
            vcpus: 1,
            memory_mib: 256,
            nic: true,
        }
    }

    #[test]
    fn every_input_change_makes_a_template_stale_with_a_reason() {
        let base = inputs();
        assert_eq!(base.stale_reason(&base), None);
        type Change = Box<dyn Fn(&mut TemplateInputs)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.banger = "0.1.0+def".into()), "banger's version changed"),
            (Box::new(|i| i.kernel.mtime_ns = 2), "kernel changed"),
            (Box::new(|i| i.initrd = Some(FileStamp { path: "/i".into(), size: 1, mtime_ns: 1 })), "kernel changed"),
            (Box::new(|i| i.rootfs.size = 2), "image changed"),
            (Box::new(|i| i.image_fingerprint = "other".into()), "image changed"),
            (Box::new(|i| i.vmm_binary.size = 9), "VMM changed"),
            (Box::new(|i| i.vmm = "firecracker".into()), "VMM changed"),
            (Box::new(|i| i.memory_mib = 512), "another shape"),
            (Box::new(|i| i.format += 1), "format changed"),
        ];
        for (change, want) in cases {
            let mut now = base.clone();
            change(&mut now);
            let why = base.stale_reason(&now).expect("stale");
            assert!(why.contains(want), "{why} should mention {want}");
        }
    }
}
