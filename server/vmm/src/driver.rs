//! The one interface to a VMM: everything that differs between QEMU and Firecracker lives behind
//! [`Driver`], so the engine asks questions ("which disk layout do templates use?") and gives orders
//! ("boot this spec", "save this template", "pause") without ever naming the VMM.
//!
//! An enum, not a trait object: there are exactly two VMMs, both known at compile time; an enum keeps the
//! calls `async fn` without boxing, makes the driver `Clone` and cheap to build per call, and each `match`
//! below is the complete list of differences for one concern.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tools_schema::daemon::{QemuAccel, VmmKind};

use super::{
    firecracker, process_marker, qemu, qmp, BootSpec, GuestChannel, GuestMemory, Launched, RootLayout, Tools, VmPaths,
    VmmError,
};
use crate::guest::GuestConn;

/// How long a control socket (QMP) may take to accept.
const CONTROL_CONNECT: Duration = Duration::from_secs(5);

/// A VMM, configured for this host.
#[derive(Debug, Clone)]
pub enum Driver {
    Qemu(QemuDriver),
    Firecracker(FirecrackerDriver),
}

/// QEMU `microvm`, with the host's acceleration and the config's QEMU choices.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    pub tools: Tools,
    /// KVM or TCG (`host::qemu_accel`).
    pub accel: QemuAccel,
    /// The guest channel over vsock (vhost-device-vsock) instead of virtio-serial.
    pub vsock: bool,
    /// The disk layout cold-booted VMs get (`qemu_root_layout`).
    pub root_layout: RootLayout,
}

/// Firecracker: raw disks, vsock, hardware KVM only.
#[derive(Debug, Clone)]
pub struct FirecrackerDriver {
    pub tools: Tools,
}

/// What the driver needs to be built for a given VMM kind.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    pub tools: Tools,
    pub qemu_accel: QemuAccel,
    pub qemu_vsock: bool,
    pub qemu_root_layout: RootLayout,
}

/// A template's saved state, as the driver restores it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Device state (QEMU's migration stream, Firecracker's snapshot file).
    pub state: PathBuf,
    /// Guest RAM.
    pub ram: PathBuf,
    /// Where the template's VMM saw its files (Firecracker; see `firecracker::spawn_anchored`).
    pub anchor: Option<PathBuf>,
}

impl Driver {
    pub fn new(kind: VmmKind, s: &DriverSettings) -> Driver {
        match kind {
            VmmKind::Qemu => Driver::Qemu(QemuDriver {
                tools: s.tools.clone(),
                accel: s.qemu_accel,
                vsock: s.qemu_vsock,
                root_layout: s.qemu_root_layout,
            }),
            VmmKind::Firecracker => Driver::Firecracker(FirecrackerDriver { tools: s.tools.clone() }),
        }
    }

    pub fn kind(&self) -> VmmKind {
        match self {
            Driver::Qemu(_) => VmmKind::Qemu,
            Driver::Firecracker(_) => VmmKind::Firecracker,
        }
    }

    fn tools(&self) -> &Tools {
        match self {
            Driver::Qemu(q) => &q.tools,
            Driver::Firecracker(f) => &f.tools,
        }
    }

    /// The VMM's program.
    pub fn binary(&self) -> &'static str {
        match self {
            Driver::Qemu(_) => "qemu-system-x86_64",
            Driver::Firecracker(_) => "firecracker",
        }
    }

    pub fn find_binary(&self) -> Option<PathBuf> {
        self.tools().find(self.binary())
    }

    /// How guests are accelerated: part of what a template depends on.
    pub fn accel(&self) -> QemuAccel {
        match self {
            Driver::Qemu(q) => q.accel,
            Driver::Firecracker(_) => QemuAccel::Kvm,
        }
    }

    /// Whether the VMM runs only on hardware KVM.
    pub fn needs_hardware_kvm(&self) -> bool {
        matches!(self, Driver::Firecracker(_))
    }

    /// Whether the VMM boots the image's ELF kernel (`kernel_elf`) rather than `kernel`.
    pub fn needs_elf_kernel(&self) -> bool {
        matches!(self, Driver::Firecracker(_))
    }

    /// The disk layout a new VM gets (Firecracker takes raw disks only).
    pub fn cold_layout(&self) -> RootLayout {
        match self {
            Driver::Qemu(q) => q.root_layout,
            Driver::Firecracker(_) => RootLayout::Overlay,
        }
    }

    /// Whether the guest channel runs over vsock (`BootSpec::vsock`).
    pub fn vsock(&self) -> bool {
        match self {
            Driver::Qemu(q) => q.vsock,
            Driver::Firecracker(_) => true,
        }
    }

    /// Whether a cold-booted agent announces on `VmPaths::vsock_ready` that it listens (QEMU's vsock, where
    /// connecting early can leave the connection unanswered for good). Firecracker's vsock refuses early
    /// connections cleanly, so there the host just retries.
    pub fn announces_vsock_ready(&self) -> bool {
        matches!(self, Driver::Qemu(q) if q.vsock)
    }

    /// How the host reaches a booted VM's agent.
    pub fn channel(&self, paths: &VmPaths) -> GuestChannel {
        if self.vsock() {
            GuestChannel::Vsock(paths.vsock())
        } else {
            GuestChannel::VirtioSerial(paths.channel())
        }
    }

    /// Why this VMM cannot snapshot a template as configured, if so.
    pub fn template_unsupported(&self) -> Option<String> {
        match self {
            Driver::Qemu(q) if q.vsock => {
                Some("the guest channel is vsock, which QEMU cannot snapshot (qemu_channel = \"vsock\")".into())
            }
            Driver::Qemu(q) if q.root_layout == RootLayout::Overlay => Some(
                "QEMU VMs use the overlay disk layout, which is not templated (qemu_root_layout = \"overlay\")".into(),
            ),
            _ => None,
        }
    }

    /// The disk layout of templates and their clones: QEMU's copy-on-write qcow2 disks, or the overlay layout
    /// for Firecracker, which takes raw disks only.
    pub fn template_layout(&self) -> RootLayout {
        match self {
            Driver::Qemu(_) => RootLayout::Qcow2,
            Driver::Firecracker(_) => RootLayout::Overlay,
        }
    }

    /// Where a template's RAM lives while it runs. QEMU maps it from the file the template keeps (shared, so
    /// stopping leaves the guest's memory there); Firecracker writes it at snapshot time.
    pub fn template_memory(&self, ram: PathBuf) -> GuestMemory {
        match self {
            Driver::Qemu(_) => GuestMemory::TemplateFile(ram),
            Driver::Firecracker(_) => GuestMemory::Anonymous,
        }
    }

    /// Whether a snapshot stores the absolute paths of the VM's files, so the template must run under an
    /// anchor folder that each clone's directory is mounted at (Firecracker).
    pub fn template_needs_anchor(&self) -> bool {
        matches!(self, Driver::Firecracker(_))
    }

    /// Whether a template's NIC needs a real TAP (Firecracker; QEMU puts it on a hub of its own).
    pub fn template_needs_tap(&self) -> bool {
        matches!(self, Driver::Firecracker(_))
    }

    /// Tells templates of different VMMs apart in the template directory.
    pub fn template_slot_suffix(&self) -> &'static str {
        match self {
            Driver::Qemu(_) => "",
            Driver::Firecracker(_) => "-fc",
        }
    }

    /// Starts the VM's VMM process from `spec` and returns once it runs (not once the guest is ready). On
    /// failure, whichever step failed, nothing of it is left: no helper, jail or cgroup (`undo_launch`).
    pub async fn launch(&self, spec: &BootSpec) -> Result<Launched, VmmError> {
        let launched = self.launch_vmm(spec).await;
        if launched.is_err() {
            super::undo_launch(spec).await;
        }
        launched
    }

    async fn launch_vmm(&self, spec: &BootSpec) -> Result<Launched, VmmError> {
        match self {
            Driver::Qemu(q) => {
                // QEMU daemonizes under umask 027: what it creates would be group-readable. The console (what
                // the guest prints) and a template's RAM file are made here first, 0600; QEMU opens them as
                // they are.
                let private = |p: &Path| {
                    crate::host_files::create_private(p)
                        .map_err(|source| VmmError::Io { what: format!("creating {}", p.display()), source })
                };
                private(&VmPaths::new(spec.dir.clone()).console_log())?;
                if let GuestMemory::TemplateFile(ram) = &spec.memory {
                    crate::host_files::create_fresh(ram)
                        .map_err(|source| VmmError::Io { what: format!("creating {}", ram.display()), source })?;
                }
                qemu::launch(&q.tools, q.accel, spec).await
            }
            Driver::Firecracker(f) => super::launch_firecracker(&f.tools, spec).await,
        }
    }

    /// Saves a template whose agent has answered: the guest is stopped, its device state goes to
    /// `snapshot.state` and its RAM is (or stays) in `snapshot.ram`. The VMM is left for the caller to end.
    pub async fn save_template(&self, dir: &Path, pid: u32, snapshot: &Snapshot) -> Result<(), VmmError> {
        match self {
            Driver::Qemu(_) => {
                let what = "saving the template";
                let mut qmp = qmp::Qmp::connect(&VmPaths::new(dir.to_path_buf()).control(), CONTROL_CONNECT)
                    .await
                    .map_err(VmmError::qmp(what))?;
                qmp.save_state(&snapshot.state).await.map_err(VmmError::qmp(what))?;
                let _ = qmp.execute("quit", serde_json::json!({})).await;
                Ok(())
            }
            Driver::Firecracker(_) => {
                let what = "saving the template";
                let fc = firecracker::FcMachine::attach(pid, dir);
                fc.pause().await.map_err(VmmError::firecracker(what))?;
                fc.snapshot(&snapshot.state, &snapshot.ram).await.map_err(VmmError::firecracker(what))?;
                // A jailed Firecracker made these as the template's uid, which a later VM may be given: they
                // become root's, as every template file is.
                for f in [&snapshot.state, &snapshot.ram] {
                    crate::host_files::take_over(f)
                        .map_err(|source| VmmError::Io { what: format!("taking {} back", f.display()), source })?;
                }
                Ok(())
            }
        }
    }

    /// Starts a clone of a template: the VMM from `spec` (the template's device set, its RAM file mapped
    /// private), the template's state loaded, resumed. Returns the VMM and a connected channel on which the
    /// first request the resumed agent reads is the caller's (QEMU: connected before the resume, so the agent
    /// never sees the port close; Firecracker: vsock connections do not survive a restore, so afresh, waiting
    /// up to `deadline`). On failure nothing of the clone runs any more.
    pub async fn restore(
        &self,
        spec: &BootSpec,
        snapshot: &Snapshot,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Result<(Launched, Arc<GuestConn>), VmmError> {
        let paths = VmPaths::new(spec.dir.clone());
        let launched = match self {
            Driver::Qemu(_) => self.launch(spec).await?,
            Driver::Firecracker(f) => {
                let anchor = snapshot.anchor.as_deref().ok_or_else(|| VmmError::Launch {
                    what: "restoring firecracker".into(),
                    detail: "a Firecracker template has an anchor folder".into(),
                })?;
                let restored = super::restore_firecracker(&f.tools, spec, anchor, snapshot).await;
                if restored.is_err() {
                    super::undo_launch(spec).await;
                }
                restored?
            }
        };
        let resumed = async {
            match self {
                Driver::Qemu(_) => {
                    let started = Instant::now();
                    let what = "restoring the template";
                    // Connect before resuming: the port then never looks disconnected to the agent.
                    let conn = GuestConn::connect(&paths.channel()).await?;
                    let mut qmp =
                        qmp::Qmp::connect(&paths.control(), CONTROL_CONNECT).await.map_err(VmmError::qmp(what))?;
                    let t_qmp = started.elapsed();
                    qmp.restore_state(&snapshot.state).await.map_err(VmmError::qmp(what))?;
                    tracing::debug!(
                        vm = %spec.vm_id,
                        qmp_ms = t_qmp.as_millis() as u64,
                        restore_ms = started.elapsed().as_millis() as u64,
                        "clone resumed"
                    );
                    Ok(conn)
                }
                Driver::Firecracker(_) => Ok(self.channel(&paths).ready(deadline, cancel).await?.0),
            }
        }
        .await;
        if resumed.is_err() {
            super::stop_vm_processes(&spec.dir, &spec.vm_id, Some(launched.pid)).await;
        }
        resumed.map(|conn| (launched, conn))
    }

    /// Stops the guest's vCPUs: its clock and its agent stand still until `resume`.
    pub async fn pause(&self, dir: &Path, pid: u32) -> Result<(), VmmError> {
        self.run_state(dir, pid, false).await
    }

    /// Lets a paused guest run again.
    pub async fn resume(&self, dir: &Path, pid: u32) -> Result<(), VmmError> {
        self.run_state(dir, pid, true).await
    }

    async fn run_state(&self, dir: &Path, pid: u32, run: bool) -> Result<(), VmmError> {
        let what = if run { "resuming the VM" } else { "pausing the VM" };
        match self {
            Driver::Qemu(_) => {
                let mut qmp = qmp::Qmp::connect(&VmPaths::new(dir.to_path_buf()).control(), CONTROL_CONNECT)
                    .await
                    .map_err(VmmError::qmp(what))?;
                qmp.execute(if run { "cont" } else { "stop" }, serde_json::json!({}))
                    .await
                    .map(drop)
                    .map_err(VmmError::qmp(what))
            }
            Driver::Firecracker(_) => {
                let fc = firecracker::FcMachine::attach(pid, dir);
                if run { fc.resume().await } else { fc.pause().await }.map_err(VmmError::firecracker(what))
            }
        }
    }

    /// Ends everything the VM runs on the host (the VMM, if `pid` is known, and its helpers).
    pub async fn kill(&self, dir: &Path, vm_id: &str, pid: Option<u32>) {
        super::stop_vm_processes(dir, vm_id, pid).await
    }

    /// Whether `pid` is still this VM's VMM.
    pub fn is_running(&self, vm_id: &str, pid: u32) -> bool {
        crate::host::process_matches(pid, &process_marker(vm_id))
    }
}
