//! Containment of VM processes, the engine's part: the uid range and the cgroup hierarchy (found once), and
//! the `Containment` each boot spec carries. The mechanism is `banger_vmm::{jail, cgroup, contain}`.
use tools_schema::daemon::{CheckStatus, DoctorCheck};
use tools_schema::vm::VmContainment;
use tools_schema::ApiError;

use crate::vmm::cgroup::{Hierarchy, Limits};
use crate::vmm::contain::{Containment, Ids};

use super::Engine;

pub(crate) struct Contain {
    pub(crate) ids: Ids,
    /// The cgroup hierarchy, found (or mounted) at the first boot; the error says why there is none.
    cgroups: std::sync::OnceLock<Result<Hierarchy, String>>,
}

impl Contain {
    pub(crate) fn new(cfg: &crate::config::ContainmentConfig) -> Contain {
        Contain { ids: Ids::new(cfg.uid_base, cfg.uid_count), cgroups: std::sync::OnceLock::new() }
    }

    pub(crate) fn hierarchy(&self) -> &Result<Hierarchy, String> {
        self.cgroups.get_or_init(|| Hierarchy::detect().map_err(|e| e.to_string()))
    }
}

impl Engine {
    /// The containment of a VM (or template) about to boot with this shape: its uid and a cgroup with its
    /// limits. A VM keeps the uid the store gives it (`vmm_uid`) from its first contained boot until it is
    /// deleted, unless some process outside this daemon's VMs runs as it meanwhile; a template's is its own
    /// for as long as it runs. `None` only when the config turns containment off.
    pub(crate) async fn containment(
        &self,
        vm_id: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Option<Containment>, ApiError> {
        if !self.cfg.containment.enabled {
            return Ok(None);
        }
        let c = &self.contain;
        let row = self.store.vm(vm_id.to_string()).await?;
        let kept = row.as_ref().and_then(|r| r.vmm_uid).filter(|u| c.ids.contains(*u) && !c.ids.in_use(*u));
        let uid = match kept {
            Some(uid) => uid,
            None => {
                let held = self.store.vm_uids().await?;
                let uid = c.ids.allocate(&held).ok_or_else(|| {
                    ApiError::internal(format!(
                        "every VM uid of the containment range ({} uids from {}) is in use",
                        c.ids.count,
                        c.ids.base + 1
                    ))
                    .with_hint("delete VMs you no longer need, or widen `containment.uid_count` in the config")
                })?;
                if row.is_some() && !self.store.claim_vm_uid(vm_id.to_string(), uid).await? {
                    c.ids.release(uid);
                    return Err(ApiError::internal(format!("uid {uid} was given to another VM meanwhile"))
                        .with_hint(crate::engine::errors::hint::RUN_AGAIN));
                }
                uid
            }
        };
        let limits = Limits::for_shape(vcpus, memory_mib).with_cpu_percent(row.as_ref().and_then(|r| r.cpu_percent));
        let cgroup = match c.hierarchy() {
            Ok(h) => Some(h.create(vm_id, limits).map_err(|e| {
                c.ids.release(uid);
                ApiError::internal(format!("creating the VM's cgroup: {e}"))
                    .with_hint("the host's cgroup hierarchy refused a new group")
                    .with_next("doctor.run", serde_json::json!({}), "checks this host's cgroups")
            })?),
            Err(why) => {
                tracing::warn!(vm = vm_id, %why, "no cgroup for the VM: its processes run without resource limits");
                None
            }
        };
        Ok(Some(Containment { uid, readers_gid: c.ids.readers_gid(), cgroup }))
    }
}

impl Engine {
    /// Changes a running VM's CPU limit (`vm.set` with `cpu_percent`; 0: back to its shape's) in its cgroup
    /// at once, and keeps it for its next boots. Refused before anything changes where the VM has no cgroup.
    pub(crate) async fn set_cpu_limit_live(&self, row: &crate::store::VmRow, percent: u32) -> Result<(), ApiError> {
        let no_cgroup = |why: String| {
            ApiError::precondition(format!("VM {} runs without a CPU cgroup ({why})", row.name))
                .with_hint("a CPU limit set while the VM is stopped takes effect at its next start")
                .with_next("doctor.run", serde_json::json!({}), "says why this host has no cgroups")
                .with_next("vm.stop", serde_json::json!({"vm": row.name}), "stops it, so its limit can be set")
        };
        if !self.cfg.containment.enabled {
            return Err(no_cgroup("containment is turned off in the config".into()));
        }
        let h = self.contain.hierarchy().as_ref().map_err(|why| no_cgroup(why.clone()))?;
        let quota = match percent {
            0 => Limits::for_shape(row.vcpus, row.memory_mib).cpu_quota_us,
            p => crate::vmm::cgroup::cpu_quota_for(p),
        };
        h.set_cpu_quota(&row.id, quota).map_err(|e| no_cgroup(e.to_string()))?;
        self.store.set_vm_cpu_percent(row.id.clone(), (percent != 0).then_some(percent)).await?;
        tracing::info!(vm = %row.name, percent, "CPU limit changed on the running VM");
        Ok(())
    }
}

impl Engine {
    /// A running VM's containment as the kernel reports it: the VMM's uid and seccomp mode from
    /// /proc/PID/status, its limits from its cgroup files. `None` unless `pid` is the VM's VMM.
    pub(crate) fn vm_containment(&self, vm_id: &str, pid: u32) -> Option<VmContainment> {
        if !crate::host::process_matches(pid, &crate::vmm::process_marker(vm_id)) {
            return None;
        }
        let field = |name: &str| {
            crate::host::status_field(pid, name).map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        };
        let uid: u32 = field("Uid")?.parse().ok()?;
        let mut info = VmContainment {
            contained: self.contain.ids.contains(uid),
            uid,
            seccomp: field("Seccomp").as_deref() == Some("2"),
            cgroup_version: None,
            memory_limit_bytes: None,
            cpu_limit_percent: None,
            pids_limit: None,
        };
        let Some(Ok(h)) = self.contain.cgroups.get() else { return Some(info) };
        if let Some(limits) = h.enforced(vm_id) {
            info.cgroup_version = Some(h.version());
            info.memory_limit_bytes = limits.memory_bytes;
            info.cpu_limit_percent = limits.cpu_percent;
            info.pids_limit = limits.pids;
        }
        Some(info)
    }
}

impl Engine {
    /// What `banger doctor` says of this host's containment: namespaces, cgroups, QEMU's seccomp sandbox and
    /// its RAM mapping, Firecracker's jailer; a warning when containment is turned off.
    pub(crate) fn containment_checks(&self) -> Vec<DoctorCheck> {
        let check = |name: &str, status, detail: String, fix: Option<&str>| DoctorCheck {
            name: name.into(),
            status,
            detail,
            fix: fix.map(str::to_string),
        };
        if !self.cfg.containment.enabled {
            return vec![check(
                "containment",
                CheckStatus::Warn,
                "turned off in the config: VMMs run as root, unconfined, with no resource limits".into(),
                Some("set [containment] enabled = true (off is for debugging a VMM only)"),
            )];
        }
        let ids = &self.contain.ids;
        let mut checks = vec![check(
            "containment",
            CheckStatus::Pass,
            format!(
                "each VMM runs as a uid of its own ({}..={}), no capabilities, NoNewPrivs, its own mount and PID \
                 namespaces over a read-only root with only its VM's files",
                ids.base + 1,
                ids.base + ids.count
            ),
            None,
        )];
        checks.push(match self.contain.hierarchy() {
            Ok(h) => check(
                "cgroups",
                CheckStatus::Pass,
                format!(
                    "per-VM limits (memory, CPU quota and weight, pids, I/O weight where offered) in {}",
                    crate::vmm::cgroup::describe().unwrap_or_else(|_| format!("cgroup v{}", h.version()))
                ),
                None,
            ),
            Err(why) => check(
                "cgroups",
                CheckStatus::Warn,
                format!("no cgroup hierarchy: VMs run without resource limits ({why})"),
                Some("mount cgroup v2 at /sys/fs/cgroup, or the v1 memory, cpu and pids controllers"),
            ),
        });
        // Seccomp filters are what every VMM's syscall policy rests on; banger's own jails need no user
        // namespaces (they run as root's children), and the helpers' filter refuses them.
        let actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
        checks.push(if actions.split_whitespace().any(|a| a == "errno") {
            check("seccomp", CheckStatus::Pass, format!("seccomp filters available ({})", actions.trim()), None)
        } else {
            check(
                "seccomp",
                CheckStatus::Fail,
                "this kernel offers no seccomp filters: QEMU's -sandbox, Firecracker's filters and banger's cannot \
                 be installed"
                    .into(),
                Some("use a kernel built with CONFIG_SECCOMP_FILTER (every distribution kernel is)"),
            )
        });
        let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
        checks.push(check(
            "user namespaces",
            CheckStatus::Pass,
            match userns.trim() {
                "" | "0" => "off on this host; banger's jails do not use them".to_string(),
                n => format!(
                    "up to {n} on this host; banger's jails do not use them, and refuse them to the VM helpers \
                     they filter"
                ),
            },
            None,
        ));
        if let Some(qemu) = self.cfg.find_binary("qemu-system-x86_64") {
            let version = crate::vmm::qemu::version(&qemu).map(|(a, b)| format!("{a}.{b}")).unwrap_or("unknown".into());
            checks.push(check(
                "qemu sandbox",
                CheckStatus::Pass,
                format!(
                    "QEMU {version}: -sandbox {}; clones map their template's RAM from a sealed copy no process can \
                     write",
                    crate::vmm::qemu::SANDBOX
                ),
                None,
            ));
        }
        if let Some(fc) = self.cfg.find_binary("firecracker") {
            checks.push(match self.cfg.find_binary("jailer") {
                Some(jailer) => check(
                    "firecracker jailer",
                    CheckStatus::Pass,
                    format!(
                        "Firecracker ({}) starts through its jailer ({}): chrooted, as the VM's uid, under its own \
                         seccomp filters",
                        fc.display(),
                        jailer.display()
                    ),
                    None,
                ),
                None => check(
                    "firecracker jailer",
                    CheckStatus::Fail,
                    "no `jailer` next to Firecracker: Firecracker VMs cannot start contained".into(),
                    Some("run scripts/setup-host.sh, which installs Firecracker with its jailer"),
                ),
            });
        }
        checks
    }
}
