//! Virtual machine monitors behind one interface.
//!
//! A VMM process runs detached from the daemon (its own session, not the daemon's child), so VMs keep
//! running across a daemon restart; the daemon finds them again by pid and by the VM id on their command
//! line. Each VM's runtime files live in its directory: the console log, the guest channel socket and the
//! VMM's control socket.
use std::path::{Path, PathBuf};
use std::time::Duration;

use tools_schema::boot::{BootArgs, ChannelKind};
use tools_schema::daemon::VmmKind;

pub mod cgroup;
pub mod contain;
pub mod driver;
pub mod fc_jail;
pub mod firecracker;
pub mod guest;
pub mod host;
pub mod host_files;
pub mod hybrid_vsock;
pub mod jail;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod sealed_ram;
pub mod syscall_filter;
pub mod tap;

pub use driver::{Driver, DriverSettings, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{binary} is not installed")]
    MissingBinary { binary: &'static str },
    /// A program banger ran failed; `detail` is what it printed (its stderr), not a flattened error.
    #[error("{what} failed: {detail}")]
    Launch { what: String, detail: String },
    #[error("i/o error while {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Qmp {
        what: &'static str,
        #[source]
        source: qmp::QmpError,
    },
    #[error("{what}: {source}")]
    Firecracker {
        what: &'static str,
        #[source]
        source: firecracker::FcError,
    },
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
}

impl VmmError {
    fn qmp(what: &'static str) -> impl Fn(qmp::QmpError) -> VmmError {
        move |source| VmmError::Qmp { what, source }
    }
    fn firecracker(what: &'static str) -> impl Fn(firecracker::FcError) -> VmmError {
        move |source| VmmError::Firecracker { what, source }
    }
}

/// Finds the host programs the drivers run (VMMs, qemu-img, mkfs.ext4, vhost-device-vsock).
pub trait FindBinary {
    fn find_binary(&self, name: &str) -> Option<PathBuf>;
}

/// Where host programs are looked for: `bin_dirs` first, then PATH, then the sbin directories.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    pub bin_dirs: Vec<PathBuf>,
}

impl Tools {
    /// Where banger's host set-up (`scripts/setup-host.sh`) installs programs: `<cache>/bin`.
    pub fn host_default() -> Tools {
        Tools { bin_dirs: vec![host::cache_dir().join("bin")] }
    }

    pub fn find(&self, name: &str) -> Option<PathBuf> {
        let path_dirs =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
        let extra = ["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from);
        self.bin_dirs
            .iter()
            .chain(path_dirs.iter())
            .chain(extra.iter())
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    }
}

impl FindBinary for Tools {
    fn find_binary(&self, name: &str) -> Option<PathBuf> {
        self.find(name)
    }
}

/// A regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The host end of a VM's guest channel.
#[derive(Debug, Clone)]
pub enum GuestChannel {
    VirtioSerial(PathBuf),
    Vsock(PathBuf),
}

impl GuestChannel {
    /// Connects once (a vsock connect fails until the guest agent listens; callers retry).
    pub async fn connect(&self) -> Result<std::sync::Arc<crate::guest::GuestConn>, crate::guest::GuestError> {
        match self {
            GuestChannel::VirtioSerial(p) => crate::guest::GuestConn::connect(p).await,
            GuestChannel::Vsock(p) => crate::guest::GuestConn::connect_vsock(p, tools_schema::guest::VSOCK_PORT).await,
        }
    }

    /// Connects and waits until the agent answers, retrying connects until `deadline`.
    pub async fn ready(
        &self,
        deadline: tokio::time::Instant,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(std::sync::Arc<crate::guest::GuestConn>, tools_schema::BuildInfo), crate::guest::GuestError> {
        loop {
            match self.connect().await {
                Ok(conn) => match conn.wait_ready(deadline, cancel).await {
                    Ok(agent) => return Ok((conn, agent)),
                    // A vsock connection accepted before the agent listened is closed at once: retry.
                    Err(crate::guest::GuestError::Closed) if tokio::time::Instant::now() < deadline => {}
                    Err(e) => return Err(e),
                },
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.cancelled() => return Err(crate::guest::GuestError::Cancelled),
            }
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub vm_id: String,
    pub hostname: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The image's ELF kernel (Firecracker boots it; QEMU boots `kernel`).
    pub kernel_elf: Option<PathBuf>,
    /// How the guest builds its root filesystem from `drives`.
    pub layout: RootLayout,
    /// The VM's disks in the order the guest sees them (the first is vda, the root device): see `RootLayout::drives`.
    pub drives: Vec<Drive>,
    pub dir: PathBuf,
    /// The VM's NIC: a TAP on the bridge and the guest's network settings.
    pub net: Option<(String, crate::net::GuestNet)>,
    /// What the engine tells the guest's agent at boot (template, filesystems to grow, SSH key). The driver
    /// fills in the rest from this spec (hostname, channel, VMM, root layout, network) and renders it:
    /// `BootSpec::agent_args` is the one place `banger.*` words are made.
    pub args: BootArgs,
    /// Use vsock instead of virtio-serial for the guest channel (QEMU; Firecracker always uses vsock).
    pub vsock: bool,
    /// Where guest RAM lives (QEMU): see `GuestMemory`.
    pub memory: GuestMemory,
    /// Template snapshots and their clones (QEMU): the NIC carries this fixed MAC (the clone's agent sets
    /// the VM's own), and a template, which has no TAP, gets a NIC whose frames go nowhere.
    pub template_mac: Option<String>,
    /// Firecracker templates: the directory the VMM sees its files under (see `firecracker::spawn_anchored`).
    pub anchor: Option<PathBuf>,
    /// How the VM's host processes are contained (QEMU); `None` only where containment is turned off.
    pub contain: Option<contain::Containment>,
}

impl BootSpec {
    /// Everything the guest's agent is told on its kernel command line: the engine's `args`, completed from
    /// the rest of the spec. QEMU guests are not told their VMM (the agent's default); templates and their
    /// clones get no network here, the agent sets the clone's own after the restore, so the command line
    /// stays the template's.
    pub fn agent_args(&self, vmm: VmmKind, channel: ChannelKind) -> BootArgs {
        BootArgs {
            hostname: Some(self.hostname.clone()),
            channel,
            vmm: (vmm == VmmKind::Firecracker).then_some(vmm),
            overlay_root: self.layout == RootLayout::Overlay,
            net: match (&self.net, &self.template_mac) {
                (Some((_, net)), None) => Some(net.boot_net()),
                _ => None,
            },
            ..self.args.clone()
        }
    }
}

/// How a guest's root filesystem is put together from its disks. Both VMMs boot both layouts (Firecracker
/// only `Overlay`: it takes raw disks only), so the layout Firecracker guests use runs under QEMU too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootLayout {
    /// The root disk is the VM's qcow2 overlay of the image's root filesystem, mounted read-write; /root is a
    /// qcow2 overlay of the work seed.
    Qcow2,
    /// The image's root filesystem itself, raw and read-only (shared by every VM of the image), an overlay disk
    /// (raw ext4 `banger-overlay`) that takes the writes through overlayfs, built by the agent as PID 1
    /// (`banger.overlay=1`) or by the initramfs, and a raw sparse copy of the work seed.
    Overlay,
}

/// A disk file's format, as the VMM must open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// Whether the guest may write a disk. A read-only disk is opened read-only on the host as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskAccess {
    ReadOnly,
    ReadWrite,
}

/// One virtio-blk disk of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Drive {
    /// The VMM's name for it (QEMU drive id, Firecracker drive_id).
    pub id: &'static str,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub access: DiskAccess,
}

impl RootLayout {
    /// The layout a VM's disks were made for: only the overlay layout has an overlay disk. A VM keeps its
    /// layout for life, whatever the config says later.
    pub fn of(paths: &VmPaths) -> RootLayout {
        if paths.overlay_disk().exists() {
            RootLayout::Overlay
        } else {
            RootLayout::Qcow2
        }
    }

    /// The VM's drives in this layout, root device first (the kernel names it vda; the agent finds the others
    /// by label).
    pub fn drives(self, paths: &VmPaths, base_rootfs: &Path, with_work: bool) -> Vec<Drive> {
        use DiskAccess::*;
        use DiskFormat::*;
        let drive = |id, path, format, access| Drive { id, path, format, access };
        let mut drives = match self {
            RootLayout::Qcow2 => vec![drive("root", paths.root_disk(), Qcow2, ReadWrite)],
            RootLayout::Overlay => vec![
                drive("base", base_rootfs.to_path_buf(), Raw, ReadOnly),
                drive("overlay", paths.overlay_disk(), Raw, ReadWrite),
            ],
        };
        if with_work {
            drives.push(match self {
                RootLayout::Qcow2 => drive("work", paths.work_disk(), Qcow2, ReadWrite),
                RootLayout::Overlay => drive("work", paths.work_disk_raw(), Raw, ReadWrite),
            });
        }
        drives
    }

    /// The kernel's own command-line words for the layout. Without an initramfs the kernel mounts the first
    /// drive (vda) itself and starts the agent as PID 1; in the overlay layout it mounts the base read-only and
    /// the agent builds the overlay root (`BootArgs::overlay_root`, set by `BootSpec::agent_args`).
    pub fn kernel_args(self, initrd: bool) -> Vec<String> {
        let mut args = vec![];
        if !initrd {
            let mode = if self == RootLayout::Overlay { "ro" } else { "rw" };
            args.extend(
                ["root=/dev/vda", mode, "rootfstype=ext4", "init=/usr/local/bin/banger-agent"].map(String::from),
            );
        }
        args
    }
}

/// Guest RAM of a QEMU VM.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestMemory {
    /// Ordinary anonymous memory.
    Anonymous,
    /// A template being made: RAM in this file, shared, so the file holds the guest's memory once the
    /// template is saved.
    TemplateFile(PathBuf),
    /// A clone: the template's RAM file mapped copy-on-write (the file never changes, so one template
    /// serves any number of clones), device state loaded through `-incoming defer`.
    CloneOf(PathBuf),
}

/// The MAC every template's NIC has; clones replace it before they are handed out.
pub const TEMPLATE_MAC: &str = "52:54:00:b0:00:01";

/// Runtime files of a VM, all inside its directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: PathBuf) -> Self {
        VmPaths { dir }
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn channel(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// Hybrid vsock socket (host side of the guest's vsock), when the VM uses vsock.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// Where a cold-booted agent says it listens (see `VSOCK_READY_PORT`).
    pub fn vsock_ready(&self) -> PathBuf {
        self.dir.join(format!("vsock.sock_{}", tools_schema::guest::VSOCK_READY_PORT))
    }
    /// vhost-user control socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock(&self) -> PathBuf {
        self.dir.join("vhost-vsock.sock")
    }
    pub fn vhost_vsock_pidfile(&self) -> PathBuf {
        self.dir.join("vhost-vsock.pid")
    }
    /// How the host reaches this VM's agent: vsock when the VM was booted with it.
    pub fn guest_channel(&self) -> GuestChannel {
        if self.vsock().exists() || self.vhost_vsock().exists() {
            GuestChannel::Vsock(self.vsock())
        } else {
            GuestChannel::VirtioSerial(self.channel())
        }
    }
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// What the VMM itself prints (start-up errors), the guest console being `console_log`.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    /// The VM's /root, cloned from the image's work seed.
    pub fn work_disk(&self) -> PathBuf {
        self.dir.join("work.qcow2")
    }
    /// Firecracker VMs (raw disks only): the overlayfs upper layer over the image's read-only root...
    pub fn overlay_disk(&self) -> PathBuf {
        self.dir.join("overlay.ext4")
    }
    /// ...and a sparse raw copy of the work seed.
    pub fn work_disk_raw(&self) -> PathBuf {
        self.dir.join("work.ext4")
    }
}

/// The marker on every VMM command line that ties the process to its VM.
pub fn process_marker(vm_id: &str) -> String {
    format!("banger-vm-{vm_id}")
}

pub struct Launched {
    pub pid: u32,
}

/// The files in a VM's folder its VMM opens (given to its group by `Containment::prepare_dir`).
fn contained_files(paths: &VmPaths, spec: &BootSpec) -> Vec<PathBuf> {
    let mut files = vec![paths.console_log(), paths.vmm_log()];
    files.extend(spec.drives.iter().filter(|d| d.path.starts_with(&spec.dir)).map(|d| d.path.clone()));
    if let GuestMemory::TemplateFile(ram) = &spec.memory {
        files.push(ram.clone());
    }
    files
}

/// The files from outside a VM's folder its VMM reads: kernel, initrd, the image's disks and every file in
/// its disks' backing chains. (A clone's template RAM is not among them: it gets a sealed copy's descriptor.)
fn outside_files(spec: &BootSpec) -> Vec<jail::Bind> {
    let mut files: Vec<jail::Bind> = vec![jail::Bind::read_only(&spec.kernel)];
    files.extend(spec.initrd.iter().map(jail::Bind::read_only));
    for d in &spec.drives {
        if !d.path.starts_with(&spec.dir) {
            files.push(jail::Bind::read_only(&d.path));
        }
        files.extend(contain::backing_chain(&d.path).into_iter().map(jail::Bind::read_only));
    }
    files.retain(|f| !f.path.starts_with(&spec.dir));
    files
}

/// Starts one of a VM's host processes on its own (its own session, so it outlives the daemon), contained as
/// the spec says (with banger's seccomp filter where `syscall_filter`: a helper that brings none), and
/// returns its pid.
fn spawn_detached(
    spec: &BootSpec,
    program: &jail::Program,
    outside: &[jail::Bind],
    kvm: bool,
    syscall_filter: bool,
) -> Result<u32, VmmError> {
    let what = format!("starting {}", program.binary.display());
    let Some(c) = &spec.contain else {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(program.binary);
        cmd.args(program.args)
            .env_clear()
            .envs(program.env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(program.output.try_clone().map_err(|source| VmmError::Io { what: what.clone(), source })?)
            .stderr(program.output.try_clone().map_err(|source| VmmError::Io { what: what.clone(), source })?);
        let fds = program.fds.to_vec();
        // SAFETY: setsid and dup2 are async-signal-safe; dup2 clears close-on-exec on the copy.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                for (src, dst) in &fds {
                    if libc::dup2(*src, *dst) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| VmmError::Io { what, source })?;
        // A std Child is not reaped on drop; the daemon reaps VM processes by pid.
        return Ok(child.id());
    };
    let mut jail = c
        .jail(&spec.vm_id, &spec.dir, outside, kvm)
        .map_err(|source| VmmError::Io { what: format!("{what} contained"), source })?;
    jail.syscall_filter = syscall_filter;
    jail::spawn(&jail, program).map_err(|e| VmmError::Launch { what, detail: e.to_string() })
}

/// Removes what contained a VM's processes once they are gone: its jail's root folder and its cgroups.
pub async fn remove_containment(vm_id: &str) {
    if let Ok(h) = cgroup::Hierarchy::mounted() {
        let dirs = h.dirs_of(vm_id);
        // A cgroup goes once its last task is reaped, which can trail the kill by a moment. Whatever is still
        // in it is the VM's (a helper that rewrote its command line would escape `kill`'s marker check).
        for _ in 0..40 {
            for pid in h.processes_of(vm_id) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                reap(pid);
            }
            cgroup::remove_dirs(&dirs);
            if dirs.iter().all(|d| !d.exists()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let root = jail::root_for(vm_id);
    if root.exists() {
        remove_empty_tree(&root);
    }
}

/// Undoes a launch that failed, whichever step it failed at: the helper started for it, its jail's folder,
/// and its cgroup (with anything left in it).
pub(crate) async fn undo_launch(spec: &BootSpec) {
    stop_helpers(&spec.dir).await;
    remove_containment(&spec.vm_id).await;
}

/// Removes `dir` and the folders below it, if they hold nothing but folders (a jail's root stays empty on the
/// host: what is in it is mounted in the jail's own namespace). Never follows a symlink.
fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Boots a Firecracker VM: the image's root filesystem read-only, an overlay disk for its writes, a raw work
/// disk, the TAP, and the guest channel on vsock.
/// A Firecracker guest kernel's command line: the kernel's own words, then the agent's.
fn firecracker_cmdline(spec: &BootSpec) -> Vec<String> {
    let mut args: Vec<String> = ["console=ttyS0", "reboot=k", "panic=1", "pci=off", "quiet"].map(String::from).into();
    args.extend(spec.layout.kernel_args(spec.initrd.is_some()));
    args.extend(spec.agent_args(VmmKind::Firecracker, ChannelKind::Vsock).render());
    args
}

pub(crate) async fn launch_firecracker(cfg: &Tools, spec: &BootSpec) -> Result<Launched, VmmError> {
    let kernel = spec.kernel_elf.clone().ok_or_else(|| VmmError::Launch {
        what: "starting firecracker".into(),
        detail: "the image has no ELF kernel (vmlinux); register it with --kernel-elf".into(),
    })?;
    let fc_err = |source: firecracker::FcError| VmmError::Firecracker { what: "starting firecracker", source };
    if spec.layout != RootLayout::Overlay {
        return Err(VmmError::Launch {
            what: "starting firecracker".into(),
            detail: "Firecracker boots only the overlay disk layout (it takes raw disks only)".into(),
        });
    }
    // The VMM's own view of the VM's files: under the anchor for a template (see spawn_anchored).
    let seen = VmPaths::new(spec.anchor.clone().unwrap_or_else(|| spec.dir.clone()));
    let drives = spec
        .drives
        .iter()
        .map(|d| firecracker::FcDrive::of(d, &spec.dir, &seen.dir))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fc_err)?;
    let mut outside: Vec<PathBuf> = std::iter::once(kernel.clone()).chain(spec.initrd.clone()).collect();
    outside.extend(spec.drives.iter().filter(|d| !d.path.starts_with(&spec.dir)).map(|d| d.path.clone()));
    let start = FcStart {
        vm_id: &spec.vm_id,
        dir: &spec.dir,
        anchor: spec.anchor.as_deref(),
        contain: spec.contain.as_ref(),
        in_dir: spec.drives.iter().filter(|d| d.path.starts_with(&spec.dir)).map(|d| d.path.clone()).collect(),
        outside,
        tap: spec.net.as_ref().map(|(tap, _)| tap.as_str()),
    };
    let machine = start_firecracker(cfg, &start).await?;
    let args = firecracker_cmdline(spec);
    let config = firecracker::FcConfig {
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel,
        initrd: spec.initrd.clone(),
        boot_args: args.join(" "),
        drives,
        net: spec.net.as_ref().map(|(tap, net)| (tap.clone(), spec.template_mac.clone().unwrap_or(net.mac.clone()))),
        vsock: Some((3, seen.vsock())),
    };
    let started = async {
        machine.configure(&config).await?;
        machine.start().await
    }
    .await;
    if let Err(e) = started {
        kill(machine.pid, &spec.vm_id).await;
        return Err(fc_err(e));
    }
    Ok(Launched { pid: machine.pid })
}

static FC_GRANTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What starting one VM's Firecracker takes.
struct FcStart<'a> {
    vm_id: &'a str,
    dir: &'a Path,
    /// A template's (and its clones') anchor: the folder Firecracker also sees the VM's folder at.
    anchor: Option<&'a Path>,
    contain: Option<&'a contain::Containment>,
    /// Files in the VM's folder Firecracker opens (its disks).
    in_dir: Vec<PathBuf>,
    /// Files from outside the VM's folder it reads: kernel, initrd, the image's base, a template's snapshot.
    outside: Vec<PathBuf>,
    tap: Option<&'a str>,
}

/// Starts a VM's Firecracker, answering on its API socket in the VM's folder: through its jailer when the VM
/// is contained (see `fc_jail`), with its TAP handed to the VM's uid (Firecracker opens it by name); directly
/// otherwise, seeing its folder at the anchor in a mount namespace of its own. Its pid is written to the
/// VM's pid file at once, so a daemon that dies from here on still finds (and cleans up) the process. What a
/// failure leaves (jail, cgroup) the driver's launch removes (`undo_launch`).
async fn start_firecracker(cfg: &Tools, s: &FcStart<'_>) -> Result<firecracker::FcMachine, VmmError> {
    let bin = cfg.find_binary("firecracker").ok_or(VmmError::MissingBinary { binary: "firecracker" })?;
    let fc_err = |source: firecracker::FcError| VmmError::Firecracker { what: "starting firecracker", source };
    let paths = VmPaths::new(s.dir.to_path_buf());
    for stale in [paths.vsock(), paths.pidfile(), paths.dir.join(firecracker::API_SOCKET_NAME)] {
        let _ = std::fs::remove_file(stale);
    }
    let marker = process_marker(s.vm_id);
    let Some(c) = s.contain else {
        let machine = match s.anchor {
            Some(anchor) => firecracker::spawn_anchored(&bin, s.dir, anchor, &marker, &paths.console_log()).await,
            None => firecracker::spawn(&bin, s.dir, &marker, &paths.console_log()).await,
        }
        .map_err(fc_err)?;
        let _ = host_files::write_fresh(&paths.pidfile(), machine.pid.to_string().as_bytes());
        return Ok(machine);
    };
    let started = async {
        let jailer = cfg.find_binary("jailer").ok_or(VmmError::MissingBinary { binary: "jailer" })?;
        let io = |what: String| move |source| VmmError::Io { what, source };
        let mut in_dir = s.in_dir.clone();
        in_dir.push(paths.console_log());
        crate::host_files::open_append(&paths.console_log()).map_err(io("creating the console log".into()))?;
        c.prepare_dir(s.dir, &in_dir).map_err(io(format!("giving {} to the VM's uid", s.dir.display())))?;
        if let Some(tap) = s.tap {
            tap::set_owner(tap, c.uid, c.gid()).map_err(io(format!("handing TAP {tap} to the VM's uid")))?;
        }
        let api_socket = paths.dir.join(firecracker::API_SOCKET_NAME);
        let base = jail::root_for(s.vm_id);
        let spec = fc_jail::JailerSpec {
            id: &marker,
            firecracker: &bin,
            uid: c.uid,
            gid: c.gid(),
            chroot_base: &base,
            api_socket: &api_socket,
        };
        // One launch at a time from granting its uid the image's files until its Firecracker runs as that uid:
        // granting drops the entries of uids no process runs as (`contain::allow_uid_read`).
        let granting = FC_GRANTS.lock().await;
        let jail = c
            .jailer_jail(&spec.root(), s.dir, s.anchor, &s.outside)
            .map_err(io("giving the image's files to the VM's uid".into()))?;
        let machine = firecracker::spawn_jailed(&jailer, &spec, &jail, &api_socket, &paths.console_log())
            .await
            .map_err(fc_err)?;
        drop(granting);
        let _ = host_files::write_fresh(&paths.pidfile(), machine.pid.to_string().as_bytes());
        Ok(machine)
    }
    .await;
    started
}

/// Starts a Firecracker clone of a template: its directory (with its copies of the template's disks) seen at
/// the template's anchor, the snapshot loaded with the memory file mapped private, its NIC moved to its own
/// TAP, resumed. The guest channel (vsock) comes back in the clone's directory; connections made before the
/// snapshot are gone, so the host connects afresh.
pub(crate) async fn restore_firecracker(
    cfg: &Tools,
    spec: &BootSpec,
    anchor: &Path,
    snapshot: &Snapshot,
) -> Result<Launched, VmmError> {
    let (state, mem) = (&snapshot.state, &snapshot.ram);
    let tap = spec.net.as_ref().map(|(tap, _)| tap.as_str());
    let start = FcStart {
        vm_id: &spec.vm_id,
        dir: &spec.dir,
        anchor: Some(anchor),
        contain: spec.contain.as_ref(),
        in_dir: spec.drives.iter().filter(|d| d.path.starts_with(&spec.dir)).map(|d| d.path.clone()).collect(),
        outside: vec![state.clone(), mem.clone()],
        tap,
    };
    let machine = start_firecracker(cfg, &start).await?;
    if let Err(e) = machine.load_snapshot(state, mem, tap).await {
        kill(machine.pid, &spec.vm_id).await;
        return Err(VmmError::Firecracker { what: "restoring firecracker", source: e });
    }
    Ok(Launched { pid: machine.pid })
}

/// Makes an empty ext4 disk (sparse) with a label, for VMMs that take raw disks.
pub async fn create_ext4_disk(cfg: &impl FindBinary, path: &Path, label: &str, bytes: u64) -> Result<(), VmmError> {
    let mkfs = cfg.find_binary("mkfs.ext4").ok_or(VmmError::MissingBinary { binary: "mkfs.ext4" })?;
    let out = tokio::process::Command::new(mkfs)
        .args(["-q", "-F", "-L", label])
        .arg(path)
        .arg(format!("{}k", bytes / 1024))
        .output()
        .await
        .map_err(|source| VmmError::Io { what: "running mkfs.ext4".into(), source })?;
    if !out.status.success() {
        return Err(VmmError::Launch {
            what: format!("making {label}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    private(path)
}

/// A disk holds a guest's data: the daemon's alone (0600), whatever the tool that made it chose.
fn private(disk: &Path) -> Result<(), VmmError> {
    crate::host_files::make_private(disk)
        .map_err(|source| VmmError::Io { what: format!("making {} private", disk.display()), source })
}

/// Copies a disk image sparsely (holes stay holes, reflinked where the filesystem can).
pub async fn copy_sparse(from: &Path, to: &Path) -> Result<(), VmmError> {
    let out = tokio::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--"])
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|source| VmmError::Io { what: "running cp".into(), source })?;
    if !out.status.success() {
        return Err(VmmError::Launch {
            what: "copying the work seed".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    private(to)
}

/// Creates a VM disk as a copy-on-write overlay (qcow2) over an image's read-only base (root filesystem or
/// work seed). Nothing is copied: the overlay starts empty and holds only the blocks the guest writes.
/// `base_format` is `raw` for an image's files, `qcow2` for a template's disks.
pub async fn create_overlay_disk(
    cfg: &impl FindBinary,
    base: &Path,
    base_format: &str,
    disk: &Path,
) -> Result<(), VmmError> {
    let qemu_img = cfg.find_binary("qemu-img").ok_or(VmmError::MissingBinary { binary: "qemu-img" })?;
    let out = tokio::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(base)
        .arg(disk)
        .output()
        .await
        .map_err(|source| VmmError::Io { what: "running qemu-img".into(), source })?;
    if !out.status.success() {
        return Err(VmmError::Launch {
            what: "creating the root disk".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    private(disk)
}

/// Virtual size of a qcow2 disk, from its header (bytes 24..32, big-endian).
pub fn qcow2_virtual_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    (&header[..4] == b"QFI\xfb").then(|| u64::from_be_bytes(header[24..32].try_into().unwrap()))
}

/// The backing file a qcow2 disk names in its header, if any.
pub fn qcow2_backing_file(path: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
    if offset == 0 || len == 0 || len > 4096 {
        return None;
    }
    let mut name = vec![0u8; len];
    f.seek(SeekFrom::Start(offset)).ok()?;
    f.read_exact(&mut name).ok()?;
    Some(PathBuf::from(String::from_utf8(name).ok()?))
}

/// Grows a stopped VM's disk (root or work) to `bytes`.
pub async fn resize_disk(cfg: &impl FindBinary, disk: &Path, bytes: u64) -> Result<(), VmmError> {
    let qemu_img = cfg.find_binary("qemu-img").ok_or(VmmError::MissingBinary { binary: "qemu-img" })?;
    let out = tokio::process::Command::new(qemu_img)
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg(bytes.to_string())
        .output()
        .await
        .map_err(|source| VmmError::Io { what: "running qemu-img".into(), source })?;
    if !out.status.success() {
        return Err(VmmError::Launch {
            what: "resizing the root disk".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Ends everything a VM runs on the host: its VMM (when `pid` is known) and its helpers. The one way to
/// stop a VM's processes, used by stop, rollback and recovery alike.
pub async fn stop_vm_processes(dir: &Path, vm_id: &str, pid: Option<u32>) {
    if let Some(pid) = pid {
        kill(pid, vm_id).await;
    }
    stop_helpers(dir).await;
    remove_containment(vm_id).await;
    // With its processes gone the folder is the daemon's alone again (the next boot gives it back): nothing
    // the VMM left there can be written to by it, nor by a later VM given the same uid.
    if let Err(e) = contain::reclaim_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot take the VM's folder back");
        }
    }
}

/// Ends the VM's helper processes (vhost-device-vsock), once its VMM is gone.
pub async fn stop_helpers(dir: &Path) {
    let pidfile = dir.join("vhost-vsock.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) else { return };
    // Its command line names its socket inside the VM's directory: that identifies it.
    let marker = dir.join("vhost-vsock.sock").display().to_string();
    if crate::host::process_matches(pid, &marker) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        wait_exit(pid, &marker, Duration::from_secs(5)).await;
    }
    reap(pid);
    let _ = std::fs::remove_file(pidfile);
}

/// Sends SIGKILL to a VMM process if it is still the VM's, and waits for it to go.
pub async fn kill(pid: u32, vm_id: &str) {
    let marker = process_marker(vm_id);
    if !crate::host::process_matches(pid, &marker) {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    wait_exit(pid, &marker, Duration::from_secs(5)).await;
}

/// Reaps an exited VMM if it is our child. VMMs detach (`-daemonize`), and bangerd is a child subreaper,
/// so they are reparented to it; reaping them by pid (never `waitpid(-1)`) leaves tokio's own children alone.
pub fn reap(pid: u32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Waits until the process is gone; true if it went within `timeout`.
pub async fn wait_exit(pid: u32, marker: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while crate::host::process_matches(pid, marker) {
        reap(pid);
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A zombie no longer shows its command line: reap it too, or it keeps its pid and uid.
    reap(pid);
    true
}
