//! VM operations.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::daemon::VmmKind;
use crate::error::ApiError;

// A VM's shape limits, defined once: the engine's and the CLI's `validate()`, the JSON schemas (schemars) and
// the CLI's argument parsers (clap) all use these.
/// Fewest and most vCPUs a VM may ask for.
pub const MIN_VCPUS: u32 = 1;
pub const MAX_VCPUS: u32 = 32;
/// Smallest and largest guest memory, MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 65536;
/// Smallest and largest root or work disk, GiB.
pub const MIN_DISK_GIB: u32 = 1;
pub const MAX_DISK_GIB: u32 = 1024;

/// Create a VM from an image and boot it. Returns once the guest agent answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    /// VM name, also its DNS name `<name>.vm`: 1-63 of a-z, 0-9 and `-`, starting with a letter. Generated
    /// when omitted.
    #[serde(default)]
    pub name: Option<String>,
    /// Image name or id. The default image when omitted.
    #[serde(default)]
    pub image: Option<String>,
    /// Number of virtual CPUs (1-32). Default 1.
    #[serde(default)]
    #[schemars(range(min = MIN_VCPUS, max = MAX_VCPUS))]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB (128-65536). Default 512.
    #[serde(default)]
    #[schemars(range(min = MIN_MEMORY_MIB, max = MAX_MEMORY_MIB))]
    pub memory_mib: Option<u32>,
    /// Force a VMM for this VM instead of the host's choice.
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// Route to other networks through NAT. Default false: the guest reaches only other guests and DNS.
    #[serde(default)]
    pub nat: Option<bool>,
    /// `auto` (default): the warm pool, else the image's warm-start template, else a cold boot; `template`:
    /// never the pool; `cold`: always boot the kernel.
    #[serde(default)]
    pub boot: Option<BootRequest>,
}

/// How `vm.create` may bring a VM up.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BootRequest {
    #[default]
    Auto,
    Template,
    Cold,
}

impl BootRequest {
    pub fn as_str(self) -> &'static str {
        match self {
            BootRequest::Auto => "auto",
            BootRequest::Template => "template",
            BootRequest::Cold => "cold",
        }
    }
}

impl std::str::FromStr for BootRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootRequest::Auto),
            "template" => Ok(BootRequest::Template),
            "cold" => Ok(BootRequest::Cold),
            _ => Err(format!("boot must be auto, template or cold, not `{s}`")),
        }
    }
}

/// Refers to one VM by name or id.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    /// VM name or id (a unique id prefix works too).
    pub vm: String,
}

/// How to reach a running VM with ssh (`vm.ssh`), once its sshd answers and its host key is pinned.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmSshInfo {
    /// VM name.
    pub vm: String,
    /// The address to connect to (the VM's IPv4 address).
    pub host: String,
    /// The VM's DNS name, `<name>.vm`, which the managed `Host *.vm` block in the ssh config covers.
    pub dns_name: String,
    /// Whether the guest's sshd answered and its host key was pinned before the daemon stopped waiting
    /// (30 s). When false ssh may still fail; it says why.
    pub ready: bool,
    /// The ssh client options, each `Option=value` for `ssh -o`: root with banger's managed key only, host
    /// keys checked strictly against banger's own known_hosts.
    pub options: Vec<String>,
}

/// Refers to one or more VMs. Repeated refs are acted on once; results come back in the order given.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRefs {
    /// A VM name or id, or a list of them.
    #[serde(alias = "vms")]
    pub vm: VmSelection,
}

/// One VM (`"dev"`) or several (`["dev", "test"]`), by name or id: `vm` means the same in every tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum VmSelection {
    One(String),
    Many(Vec<String>),
}

impl VmSelection {
    pub fn is_empty(&self) -> bool {
        matches!(self, VmSelection::Many(names) if names.is_empty())
    }

    /// The names or ids, in the order given.
    pub fn into_names(self) -> Vec<String> {
        match self {
            VmSelection::One(name) => vec![name],
            VmSelection::Many(names) => names,
        }
    }
}

impl From<Vec<String>> for VmSelection {
    fn from(names: Vec<String>) -> Self {
        VmSelection::Many(names)
    }
}

impl From<String> for VmSelection {
    fn from(name: String) -> Self {
        VmSelection::One(name)
    }
}

impl Default for VmSelection {
    fn default() -> Self {
        VmSelection::Many(vec![])
    }
}

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Being created or started; not ready yet.
    Starting,
    /// The guest agent answers.
    Running,
    /// Being stopped.
    Stopping,
    /// Not running; its disks are kept.
    Stopped,
    /// Its VMM died unexpectedly or it failed to start; see `vm logs`.
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }
}

/// One VM.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// Name of the image the VM was created from.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VMM that runs this VM.
    pub vmm: VmmKind,
    /// VMM process id while running.
    pub pid: Option<u32>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// Last boot time, seconds since the Unix epoch.
    pub started_at: Option<i64>,
    /// Why the VM is `failed`, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The guest's IPv4 address on the banger bridge, when networking is enabled.
    pub ip: Option<String>,
    /// DNS name of the VM, answered by banger's DNS server on the bridge: `<name>.vm`.
    pub dns_name: String,
    /// Whether the VM can reach other networks through NAT.
    pub nat: bool,
    /// Size of the VM's root disk in bytes (its filesystem grows to it at boot).
    pub disk_bytes: Option<u64>,
    /// Size of the VM's work disk (mounted at /root) in bytes.
    pub work_disk_bytes: Option<u64>,
    /// How this daemon last brought the VM up (absent when it has not, e.g. after a daemon restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootInfo>,
    /// How the running VM's VMM is contained, as the kernel reports it (absent when it is not running,
    /// and `contained: false` when containment is turned off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<VmContainment>,
}

/// A running VM's containment, read from /proc and its cgroup files.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
pub struct VmContainment {
    pub contained: bool,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// QEMU's seccomp filter is active (`Seccomp: 2`).
    pub seccomp: bool,
    /// 1 or 2; absent when the VM has no cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// CPU time allowed, in percent of one CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_percent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
}

/// How a VM was brought up.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct BootInfo {
    pub mode: BootMode,
    /// Why a new VM was booted cold instead of restored from a template, e.g. `no template for this image
    /// and shape yet` or `the template is stale: the image's kernel changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_reason: Option<String>,
    /// Milliseconds from starting the VMM (or taking a pooled VM) until the guest agent answered as this VM.
    pub ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// The kernel booted from scratch.
    Cold,
    /// Restored from the image's template snapshot, then given its own identity.
    Warm,
    /// Taken from the warm pool (restored earlier, waiting), then given its own identity.
    Pool,
}

/// All VMs.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
}

/// The outcome for one VM of a multi-VM operation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmOutcome {
    /// The ref as the caller gave it.
    pub vm: String,
    /// The VM after the operation, when it succeeded (absent after delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<VmInfo>,
    /// Why it failed for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// Per-VM results of a multi-VM operation, in the order the refs were given.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmBatchResult {
    pub results: Vec<VmOutcome>,
    /// True when every VM succeeded.
    pub ok: bool,
}

/// Run a command inside a running VM and wait for it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecParams {
    /// VM name or id.
    pub vm: String,
    /// Program and arguments, e.g. `["uname", "-a"]`. Use `["sh", "-c", "..."]` for shell syntax.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default /root).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text for its stdin (then closed); empty without it.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds (1-86400). Default 600.
    #[serde(default)]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_secs: Option<u64>,
    /// Bytes of each output stream in the result (default 256 KiB); the rest via vm_exec_output.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8388608))]
    pub max_inline_bytes: Option<u64>,
}

/// Default and largest `max_inline_bytes` of vm.exec.
pub const EXEC_INLINE_DEFAULT: u64 = 256 << 10;
pub const EXEC_INLINE_MAX: u64 = 8 << 20;

/// How a command ended, and what it printed.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmExecResult {
    /// Exit code; absent when the command was killed by a signal.
    pub exit_code: Option<i32>,
    /// Signal that killed the command, if any.
    pub signal: Option<i32>,
    /// True when the command was killed because it ran past its timeout.
    pub timed_out: bool,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// True when stdout is longer than what came back inline (`stdout_bytes` says how long): read the rest
    /// with vm_exec_output.
    pub stdout_truncated: bool,
    /// True when stderr is longer than what came back inline.
    pub stderr_truncated: bool,
    /// Everything the command wrote to stdout, in bytes.
    #[serde(default)]
    pub stdout_bytes: u64,
    #[serde(default)]
    pub stderr_bytes: u64,
    /// Set when output was cut: pass it to vm_exec_output to read the whole streams. Kept for the VM's last
    /// 16 such commands, and until the VM is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_id: Option<String>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// The VM's console (boot) log.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    /// VM name or id.
    pub vm: String,
    /// Return at most this many trailing lines (default 200).
    #[serde(default)]
    pub tail: Option<u32>,
}

/// Console log lines.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmLogs {
    pub lines: Vec<String>,
    /// Path of the full log on the host.
    pub path: String,
}

/// Change the shape of stopped VMs. Only the fields given change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSetParams {
    /// A VM name or id, or a list (`vms` is read as the same). Each must be stopped (its VMM cannot change
    /// shape while running).
    #[serde(alias = "vms")]
    pub vm: VmSelection,
    /// Virtual CPUs (1-32).
    #[serde(default)]
    #[schemars(range(min = MIN_VCPUS, max = MAX_VCPUS))]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB (128-65536).
    #[serde(default)]
    #[schemars(range(min = MIN_MEMORY_MIB, max = MAX_MEMORY_MIB))]
    pub memory_mib: Option<u32>,
    /// Root disk size in GiB (1-1024). Disks only grow; the guest's filesystem grows at the next boot.
    #[serde(default)]
    #[schemars(range(min = MIN_DISK_GIB, max = MAX_DISK_GIB))]
    pub disk_gib: Option<u32>,
    /// Size of the work disk mounted at /root, in GiB (1-1024). Grow only; its filesystem grows at the
    /// next boot.
    #[serde(default)]
    #[schemars(range(min = MIN_DISK_GIB, max = MAX_DISK_GIB))]
    pub work_disk_gib: Option<u32>,
    /// Give the VM NAT to other networks (or take it away), from the next start.
    #[serde(default)]
    pub nat: Option<bool>,
    /// CPU the VM's host processes may use, in percent of one host CPU (10-3250; 0 returns to the
    /// default: 100 per vCPU plus 50). The one change a running VM takes: applied at once, and kept.
    #[serde(default)]
    #[schemars(range(max = MAX_CPU_PERCENT))]
    pub cpu_percent: Option<u32>,
}

/// The least CPU limit `vm.set` takes (a guest below a tenth of a CPU barely answers its agent).
pub const MIN_CPU_PERCENT: u32 = 10;
/// The most: every vCPU a whole host CPU, plus half a CPU for the VMM itself.
pub const MAX_CPU_PERCENT: u32 = MAX_VCPUS * 100 + 50;

impl VmSetParams {
    /// Whether this changes only what a running VM can take (its CPU limit).
    pub fn is_live(&self) -> bool {
        self.cpu_percent.is_some()
            && self.vcpus.is_none()
            && self.memory_mib.is_none()
            && self.disk_gib.is_none()
            && self.work_disk_gib.is_none()
            && self.nat.is_none()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.vm.is_empty() {
            return Err("name at least one VM".into());
        }
        if self.vcpus.is_none()
            && self.memory_mib.is_none()
            && self.disk_gib.is_none()
            && self.work_disk_gib.is_none()
            && self.nat.is_none()
            && self.cpu_percent.is_none()
        {
            return Err("nothing to change: give vcpus, memory_mib, disk_gib, work_disk_gib, nat or cpu_percent".into());
        }
        if let Some(p) = self.cpu_percent {
            if p != 0 && !(MIN_CPU_PERCENT..=MAX_CPU_PERCENT).contains(&p) {
                return Err(format!(
                    "cpu_percent must be 0 (the shape's default) or between {MIN_CPU_PERCENT} and {MAX_CPU_PERCENT}, got {p}"
                ));
            }
        }
        VmCreateParams { vcpus: self.vcpus, memory_mib: self.memory_mib, ..Default::default() }.validate()?;
        for (field, value) in [("disk_gib", self.disk_gib), ("work_disk_gib", self.work_disk_gib)] {
            if let Some(d) = value {
                if !(MIN_DISK_GIB..=MAX_DISK_GIB).contains(&d) {
                    return Err(format!("{field} must be between {MIN_DISK_GIB} and {MAX_DISK_GIB}, got {d}"));
                }
            }
        }
        Ok(())
    }
}

/// Resource use of one VM.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    /// CPU time the VMM process has used, seconds (host view).
    pub host_cpu_seconds: Option<f64>,
    /// Resident memory of the VMM process, bytes (host view).
    pub host_rss_bytes: Option<u64>,
    /// Root disk: virtual size and host space actually used, bytes.
    pub disk_bytes: Option<u64>,
    pub disk_host_bytes: Option<u64>,
    /// What the guest reports, while it runs.
    pub guest: Option<GuestStats>,
}

/// The guest's own view of its resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GuestStats {
    pub uptime_secs: f64,
    /// 1-minute load average.
    pub load1: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Root filesystem size and use, bytes.
    pub root_total_bytes: u64,
    pub root_used_bytes: u64,
    pub processes: u32,
}

/// What kind of service a listening port speaks, as far as banger can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PortProtocol {
    Tcp,
    Udp,
    /// TCP that completed a TLS handshake probe (checked before plain HTTP, so TLS services that answer bad
    /// cleartext requests with an HTTP error are not mislabelled).
    Https,
    /// TCP that answered an HTTP request.
    Http,
}

/// One listening port of a guest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmPort {
    pub proto: PortProtocol,
    /// Where to reach it from the host: `<name>.vm:PORT`, a URL for http(s), or `127.0.0.1:PORT (guest
    /// only)` for loopback listeners.
    pub endpoint: String,
    pub port: u16,
    /// Address the socket is bound to in the guest.
    pub bind: String,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub command: Option<String>,
}

/// Listening ports of a VM, dual-stack duplicates shown once.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmPorts {
    pub vm: String,
    pub ports: Vec<VmPort>,
}

/// Largest file content one `vm.file_write` or `vm.file_read` call carries; larger files go in chunks
/// (`append` to write, `offset` to read).
pub const MAX_FILE_CHUNK: u64 = 8 << 20;

/// How file content is carried in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContentEncoding {
    /// UTF-8 text as is.
    Text,
    /// Any bytes, base64 (standard alphabet, padded).
    Base64,
}

/// Write a file inside a running VM (parent directories are created).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFileWriteParams {
    /// VM name or id.
    pub vm: String,
    /// Absolute path in the guest.
    pub path: String,
    /// The content, at most 8 MiB once decoded; write bigger files in chunks with `append`.
    pub content: String,
    /// `text` (default) or `base64` for binary content.
    #[serde(default)]
    pub encoding: Option<ContentEncoding>,
    /// Permission bits as an octal string, e.g. "0755". Default "0644" for new files.
    #[serde(default)]
    pub mode: Option<String>,
    /// Append to the file instead of replacing it.
    #[serde(default)]
    pub append: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmFileWriteResult {
    pub path: String,
    /// Bytes written by this call.
    pub bytes: u64,
    /// Size of the file afterwards.
    pub size: u64,
    /// sha256 of the bytes written by this call, hex.
    pub sha256: String,
}

/// Read (part of) a file inside a running VM.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmFileReadParams {
    /// VM name or id.
    pub vm: String,
    /// Absolute path in the guest.
    pub path: String,
    /// Byte offset to start at (default 0).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Bytes to read, at most 8 MiB (the default).
    #[serde(default)]
    pub limit: Option<u64>,
    /// `text` or `base64`; by default text when the bytes are valid UTF-8, base64 otherwise.
    #[serde(default)]
    pub encoding: Option<ContentEncoding>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmFileReadResult {
    pub path: String,
    pub content: String,
    pub encoding: ContentEncoding,
    pub offset: u64,
    /// Bytes in this chunk.
    pub bytes: u64,
    /// Size of the whole file.
    pub size: u64,
    /// True when this chunk reaches the end of the file; otherwise read on from `next_offset`.
    pub eof: bool,
    pub next_offset: Option<u64>,
    /// Permission bits, octal, e.g. "0644".
    pub mode: String,
    /// sha256 of the bytes in this chunk, hex.
    pub sha256: String,
}

/// Parses an octal permission string like "0755".
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("mode `{s}` is not octal permission bits like \"0644\""))
}

/// Validates a VM or image name; returns a message saying what is wrong.
/// A size as people write it, in whole units of `unit_mib` MiB (1 for a `*_mib` field, 1024 for `*_gib`): a
/// plain number is already in that unit; `512M`, `2G`, `1.5GiB`, `1T` are converted. None when it is not a
/// whole, positive number of the unit. The daemon mends arguments with it; the CLI reads its sizes with it.
pub fn parse_size(text: &str, unit_mib: u64) -> Option<u64> {
    let t = text.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Some(n);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (amount, unit) = t.split_at(split);
    let amount: f64 = amount.parse().ok()?;
    let mib = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "k" => amount / 1024.0,
        "m" => amount,
        "g" => amount * 1024.0,
        "t" => amount * 1024.0 * 1024.0,
        _ => return None,
    };
    let n = mib / unit_mib as f64;
    (n.fract() == 0.0 && n > 0.0).then_some(n as u64)
}

pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{kind} name `{name}` must be 1-63 characters long"));
    }
    if !ok_chars || !name.starts_with(|c: char| c.is_ascii_lowercase()) || name.ends_with('-') {
        return Err(format!(
            "{kind} name `{name}` is invalid: use lowercase letters, digits and `-`, start with a letter, \
             and do not end with `-`"
        ));
    }
    Ok(())
}

impl VmCreateParams {
    /// The same request with vcpus and memory_mib moved into their ranges (what an error offers instead).
    pub fn within_range(&self) -> VmCreateParams {
        VmCreateParams {
            vcpus: self.vcpus.map(|v| v.clamp(MIN_VCPUS, MAX_VCPUS)),
            memory_mib: self.memory_mib.map(|m| m.clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB)),
            ..self.clone()
        }
    }

    /// Checks every field that can be checked without daemon state.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = &self.name {
            validate_name("VM", n)?;
        }
        if let Some(v) = self.vcpus {
            if !(MIN_VCPUS..=MAX_VCPUS).contains(&v) {
                return Err(format!("vcpus must be between {MIN_VCPUS} and {MAX_VCPUS}, got {v}"));
            }
        }
        if let Some(m) = self.memory_mib {
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
                return Err(format!("memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {m}"));
            }
        }
        Ok(())
    }
}

impl VmExecParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("command must name a program, e.g. [\"uname\", \"-a\"]".into());
        }
        if let Some(t) = self.timeout_secs {
            if t == 0 || t > 86400 {
                return Err(format!("timeout_secs must be between 1 and 86400, got {t}"));
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(format!("cwd must be an absolute path, got `{cwd}`"));
            }
        }
        if let Some(m) = self.max_inline_bytes {
            if m > EXEC_INLINE_MAX {
                return Err(format!("max_inline_bytes must be at most {EXEC_INLINE_MAX}, got {m}"));
            }
        }
        Ok(())
    }
}

/// One output stream of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecStream {
    Stdout,
    Stderr,
}

impl ExecStream {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStream::Stdout => "stdout",
            ExecStream::Stderr => "stderr",
        }
    }
}

/// Read the full output of a command whose vm.exec result was cut (it has an `output_id`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecOutputParams {
    /// VM name or id.
    pub vm: String,
    /// The `output_id` of the vm.exec result.
    pub output_id: String,
    pub stream: ExecStream,
    /// Byte offset to start at (default 0).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Bytes to return, at most 8 MiB (default 256 KiB).
    #[serde(default)]
    pub limit: Option<u64>,
    /// `text` or `base64`; by default text when the bytes are valid UTF-8, base64 otherwise.
    #[serde(default)]
    pub encoding: Option<ContentEncoding>,
}

/// A chunk of a command's output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VmExecOutputChunk {
    pub output_id: String,
    pub stream: ExecStream,
    pub content: String,
    pub encoding: ContentEncoding,
    pub offset: u64,
    /// Bytes in this chunk.
    pub bytes: u64,
    /// Length of the whole stream as kept (everything the command wrote, up to 1 GiB).
    pub total_bytes: u64,
    /// True when this chunk reaches the end; otherwise read on from `next_offset`.
    pub eof: bool,
    pub next_offset: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_takes_one_name_or_a_list_and_the_old_vms_still_reads() {
        let read = |j: serde_json::Value| serde_json::from_value::<VmRefs>(j).map(|r| r.vm.into_names());
        assert_eq!(read(serde_json::json!({"vm": "dev"})).unwrap(), ["dev"]);
        assert_eq!(read(serde_json::json!({"vm": ["a", "b"]})).unwrap(), ["a", "b"]);
        assert_eq!(read(serde_json::json!({"vms": ["a"]})).unwrap(), ["a"]);
        assert!(read(serde_json::json!({"vm": 5})).is_err());
        assert!(read(serde_json::json!({"vm": "a", "name": "b"})).is_err(), "unknown fields are still refused");
        let logs: crate::session::SessionLogsParams =
            serde_json::from_value(serde_json::json!({"session": "s", "from": 3})).unwrap();
        assert_eq!(logs.offset, Some(3), "`from` reads as `offset`");
    }

    /// The shape limits exist once (the consts); the schemas' ranges come from them, and every description
    /// that spells a range out must spell the same one.
    #[test]
    fn shape_limits_in_schemas_and_descriptions_match_the_constants() {
        let limits = [
            ("vcpus", MIN_VCPUS, MAX_VCPUS),
            ("memory_mib", MIN_MEMORY_MIB, MAX_MEMORY_MIB),
            ("disk_gib", MIN_DISK_GIB, MAX_DISK_GIB),
            ("work_disk_gib", MIN_DISK_GIB, MAX_DISK_GIB),
        ];
        let schemas = [
            ("VmCreateParams", schemars::schema_for!(VmCreateParams)),
            ("VmSetParams", schemars::schema_for!(VmSetParams)),
            ("ImageWarmParams", schemars::schema_for!(crate::image::ImageWarmParams)),
        ];
        let mut checked = 0;
        for (ty, schema) in &schemas {
            let props = schema.get("properties").and_then(|p| p.as_object()).expect("object schema");
            for (field, min, max) in limits {
                let Some(prop) = props.get(field) else { continue };
                assert_eq!(prop.get("minimum"), Some(&serde_json::json!(min)), "{ty}.{field}: {prop}");
                assert_eq!(prop.get("maximum"), Some(&serde_json::json!(max)), "{ty}.{field}: {prop}");
                let description = prop.get("description").and_then(|d| d.as_str()).unwrap_or_default();
                if description.contains(|c: char| c.is_ascii_digit()) {
                    assert!(description.contains(&format!("{min}-{max}")), "{ty}.{field}: {description}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 8, "every shape field of the three param types was checked");
    }
}
