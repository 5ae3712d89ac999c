//! Containment of VM processes, the engine's part: the uid range and the cgroup hierarchy (found once), and
//! the `Containment` each boot spec carries. The mechanism is `banger_vmm::{jail, cgroup, contain}`.
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
    /// The containment of a VM (or template) about to boot with this shape: a uid of its own and a cgroup
    /// with its limits. `None` only when the config turns containment off.
    pub(crate) fn containment(
        &self,
        vm_id: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Option<Containment>, ApiError> {
        if !self.cfg.containment.enabled {
            return Ok(None);
        }
        let c = &self.contain;
        let uid = c.ids.allocate().ok_or_else(|| {
            ApiError::internal(format!(
                "every VM uid of the containment range ({} uids from {}) is in use",
                c.ids.count,
                c.ids.base + 1
            ))
            .with_hint("stop or delete VMs you no longer need, or widen `containment.uid_count` in the config")
        })?;
        let cgroup = match c.hierarchy() {
            Ok(h) => Some(h.create(vm_id, Limits::for_shape(vcpus, memory_mib)).map_err(|e| {
                c.ids.release(uid);
                ApiError::internal(format!("creating the VM's cgroup: {e}"))
                    .with_hint("`banger doctor` checks this host's cgroups")
            })?),
            Err(why) => {
                tracing::warn!(vm = vm_id, %why, "no cgroup for the VM: its processes run without resource limits");
                None
            }
        };
        Ok(Some(Containment { uid, readers_gid: c.ids.readers_gid(), cgroup }))
    }
}
