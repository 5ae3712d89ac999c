//! Daemon-level operations: ping, status, doctor.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::BuildInfo;

/// No parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The daemon answered.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PingResult {
    /// The running daemon's build.
    pub build: BuildInfo,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
}

/// Which virtual machine monitor drives guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    /// Firecracker, on hosts with hardware KVM (Intel VT-x or AMD-V).
    Firecracker,
    /// QEMU `microvm` machine: KVM-accelerated where hardware KVM works, software emulation (TCG) otherwise.
    Qemu,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Firecracker => "firecracker",
            VmmKind::Qemu => "qemu",
        }
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "firecracker" => Ok(VmmKind::Firecracker),
            "qemu" => Ok(VmmKind::Qemu),
            other => Err(format!("unknown VMM `{other}`: expected `firecracker` or `qemu`")),
        }
    }
}

/// How the host accelerates guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Acceleration {
    /// Hardware KVM (vmx/svm): full-speed guests.
    HardwareKvm,
    /// A KVM device exists but is not hardware virtualisation (e.g. the paravirtual kvm_pvm module):
    /// ordinary guest kernels cannot boot on it.
    ParavirtKvm,
    /// No usable KVM: software emulation only.
    None,
}

/// How QEMU runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QemuAccel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// Software emulation (QEMU's Tiny Code Generator).
    Tcg,
}

impl QemuAccel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            QemuAccel::Kvm => "kvm",
            QemuAccel::Tcg => "tcg",
        }
    }
}

/// The VMM this host will use for new VMs, and why.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmmChoice {
    /// The VMM new VMs get unless a VM or the config asks for another.
    pub vmm: VmmKind,
    /// Whether QEMU runs guests with KVM or with software emulation (TCG).
    pub qemu_accel: QemuAccel,
    /// What the host offers.
    pub acceleration: Acceleration,
    /// Why this VMM was chosen, in a sentence.
    pub reason: String,
}

/// The daemon's state at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DaemonStatus {
    /// The running daemon's build.
    pub build: BuildInfo,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The Unix socket the daemon serves JSON-RPC and MCP on.
    pub socket: String,
    /// Where the daemon keeps its database, VM disks and runtime files.
    pub state_dir: String,
    /// The daemon's structured (JSON) log file, when it logs to a file.
    pub log_file: Option<String>,
    /// The VMM new VMs will use, and why.
    pub vmm: VmmChoice,
    /// Number of VMs known to the daemon.
    pub vms_total: u32,
    /// Number of VMs currently running.
    pub vms_running: u32,
    /// Number of registered images.
    pub images: u32,
    /// Private key that logs into guests as root (`banger vm ssh`, `ssh <name>.vm`).
    pub ssh_key: String,
    /// Login URL of the localhost web console, with the install's token; absent when the console is
    /// disabled or could not listen. Open it in a browser on this machine.
    pub web_url: Option<String>,
    /// The warm pool: restored VMs waiting to be handed out by vm.create.
    pub warm_pool: WarmPoolStatus,
    /// What the host can take and what the daemon has promised (`[limits]` in the config).
    pub limits: LimitsStatus,
    /// What the host is doing now: load and the state directory's disk.
    pub host: HostStatus,
}

/// What the host is doing now (the web console's dashboard reads it here, not from /proc itself).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HostStatus {
    /// Load averages over 1, 5 and 15 minutes; absent when /proc/loadavg cannot be read.
    pub load_average: Option<[f64; 3]>,
    /// Size of the filesystem that holds the state directory (VM disks, images), bytes; absent when it
    /// cannot be read.
    pub state_disk_total_bytes: Option<u64>,
    /// What is free on it for the daemon, bytes.
    pub state_disk_free_bytes: Option<u64>,
}

/// The host's capacity, the daemon's budget and what its VMs are promised. A create (or start, or pool
/// refill) that would take the promised memory past the budget is refused before anything is made; creates
/// beyond `max_concurrent_creates` wait in a FIFO queue.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LimitsStatus {
    /// The host's memory (MemTotal), MiB.
    pub memory_total_mib: u64,
    /// Memory available now (MemAvailable), MiB.
    pub memory_available_mib: u64,
    /// The host's CPUs (as this process may use them).
    pub cpus: u32,
    /// `limits.memory_overcommit_ratio`: the budget as a multiple of MemTotal.
    pub memory_overcommit_ratio: f64,
    /// Memory all VMs together may be promised, MiB (the ratio's, or `limits.memory_mib` when lower).
    pub memory_budget_mib: u64,
    /// Memory promised now, MiB: VMs running, starting or being created, pooled VMs and pool refills.
    pub memory_promised_mib: u64,
    /// Boots (creates, starts, pool refills) that may run at once.
    pub max_concurrent_creates: u32,
    /// Boots running now.
    pub creates_running: u32,
    /// Boots waiting for a slot now.
    pub creates_waiting: u32,
}

impl LimitsStatus {
    /// One line for humans (`daemon status`, doctor, the web console).
    pub fn summary(&self) -> String {
        format!(
            "memory {} of {} MiB promised (budget {} x {} MiB total; {} MiB available now); boots {} of {} at once, \
             {} waiting; {} CPUs",
            self.memory_promised_mib,
            self.memory_budget_mib,
            self.memory_overcommit_ratio,
            self.memory_total_mib,
            self.memory_available_mib,
            self.creates_running,
            self.max_concurrent_creates,
            self.creates_waiting,
            self.cpus
        )
    }
}

/// The warm pool's state (`warm.pool_size` for the default image and `warm.pools` by image name in the
/// config; sizes of 0 turn it off).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WarmPoolStatus {
    /// How many the daemon keeps ready over all images (while host memory allows).
    pub size: u32,
    /// How many wait now.
    pub ready: u32,
    /// How many are being restored right now.
    pub filling: u32,
    /// The shape of pooled VMs (the daemon's default): only creates of this shape are served from the pool.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Per pooled image.
    pub images: Vec<WarmPoolImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WarmPoolImage {
    pub image: String,
    pub size: u32,
    pub ready: u32,
    pub filling: u32,
}

/// Outcome of one doctor check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
}

/// One prerequisite the doctor looked at.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DoctorCheck {
    /// Short name of the check, e.g. `qemu`.
    pub name: String,
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// How to fix it, when it is not a pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// What doctor.run looks at.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DoctorParams {
    /// Also boot a throwaway guest on each VMM this host can run (QEMU always; Firecracker where hardware KVM
    /// is present), run a command in it and delete it. Takes a few seconds per VMM; nothing it makes outlives it.
    #[serde(default)]
    pub boot: bool,
}

/// Every prerequisite banger needs on this host, and the VMM it will use.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DoctorReport {
    pub checks: Vec<DoctorCheck>,
    /// The VMM new VMs will use, and why.
    pub vmm: VmmChoice,
    /// With `boot`: one boot self-test per VMM (empty otherwise).
    #[serde(default)]
    pub boots: Vec<BootCheck>,
    /// True when no check (and no boot self-test) failed.
    pub ok: bool,
}

/// A boot self-test of one VMM: a throwaway guest booted cold, a command run in it, the guest deleted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BootCheck {
    pub vmm: VmmKind,
    /// `pass`, `fail`, or `warn` when the VMM was not tried on this host (the detail says why).
    pub status: CheckStatus,
    /// Whether a guest was booted (false when the VMM cannot run here).
    pub tried: bool,
    /// From the create request to a guest agent that answers, in milliseconds (when it booted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// What happened, in a sentence (the error when it failed).
    pub detail: String,
    /// On failure: the last lines of the guest console and of the VMM's helper logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}
