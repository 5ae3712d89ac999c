//! Per-VM control groups: the limits a VM's host processes (VMM and helpers) run under, so a guest that
//! takes all the memory or CPU it is given hits its own cgroup's limit, not the host's or the daemon's.
//!
//! Both layouts are handled: cgroup v2 (one unified hierarchy: systemd hosts) and v1 (one hierarchy per
//! controller, such as these test hosts). A VM's cgroup is made under the daemon's own (`/proc/self/cgroup`),
//! in a `banger` child, so whatever limits the daemon itself runs under also bind its VMs. Where the
//! hierarchies are not mounted in the daemon's mount namespace (`ip netns exec` remounts /sys), the daemon
//! mounts them itself under `/run/banger-cgroup`.
use std::path::{Path, PathBuf};

/// Memory a VMM needs beyond guest RAM (its own code, TCG's translation cache, device buffers): the limit is
/// guest RAM plus this.
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// Tasks a VM's processes may have (QEMU runs a thread per vCPU plus a worker pool of up to 64).
pub const PIDS_MAX: u64 = 512;
pub const CPU_PERIOD_US: u64 = 100_000;
/// Relative block I/O weight (100 is the default of both layouts' weight files).
pub const IO_WEIGHT: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per `CPU_PERIOD_US`: each vCPU a whole CPU, plus half a CPU for the VMM's own threads.
    pub cpu_quota_us: u64,
    /// Share of the CPU under contention, on v2's scale (100 is a default cgroup's): 100 per vCPU, so VMs
    /// that all want more than there is get CPU in proportion to their size.
    pub cpu_weight: u64,
    pub pids: u64,
}

impl Limits {
    pub fn for_shape(vcpus: u32, memory_mib: u32) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20,
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US + CPU_PERIOD_US / 2,
            cpu_weight: (u64::from(vcpus) * 100).clamp(1, 10_000),
            pids: PIDS_MAX,
        }
    }

    /// These limits with the CPU quota set to `percent` of one host CPU, where one is set.
    pub fn with_cpu_percent(self, percent: Option<u32>) -> Limits {
        match percent {
            Some(p) => Limits { cpu_quota_us: cpu_quota_for(p), ..self },
            None => self,
        }
    }
}

/// The quota per `CPU_PERIOD_US` that is `percent` of one CPU.
pub fn cpu_quota_for(percent: u32) -> u64 {
    u64::from(percent) * CPU_PERIOD_US / 100
}

/// A VM's limits as its cgroup files say (what the kernel enforces, not what banger asked for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enforced {
    pub memory_bytes: Option<u64>,
    pub cpu_percent: Option<u64>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy's mount point and the daemon's cgroup in it.
    V2 { mount: PathBuf, own: PathBuf },
    /// Per controller: its hierarchy's mount point and the daemon's cgroup in it.
    V1 { controllers: Vec<(String, PathBuf, PathBuf)> },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("this host has no cgroup hierarchy banger can use ({0})")]
    Unavailable(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// The v1 controllers banger limits (cpuacct, freezer and the rest are left alone).
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "pids", "blkio"];
const V2_CONTROLLERS: &[&str] = &["memory", "cpu", "pids", "io"];
const OWN_MOUNTS: &str = "/run/banger-cgroup";

impl Hierarchy {
    /// Finds (or mounts) the hierarchies the daemon's cgroups are in.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        Self::find(true)
    }

    /// `detect` for clean-up, which must not mount a hierarchy no VM was ever put in: it mounts only where an
    /// earlier daemon mounted banger's own (its folder under /run is left). A daemon's mounts live in its mount
    /// namespace, so the next daemon (`ip netns exec` makes a new one each time) must mount them again to
    /// reach the cgroups of VMs that died while no daemon watched.
    pub fn mounted() -> Result<Hierarchy, CgroupError> {
        Self::find(false)
    }

    fn find(mount: bool) -> Result<Hierarchy, CgroupError> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(io("reading", Path::new("/proc/self/cgroup")))?;
        let mount_own = |fstype: &str, options: &str, at: &Path| match mount || at.is_dir() {
            true => mount_own(fstype, options, at),
            false => Err(CgroupError::Unavailable(format!("{} is not mounted", at.display()))),
        };
        Self::from_proc(&own, &mounts(), mount_own)
    }

    fn from_proc(
        own: &str,
        mounts: &[(String, PathBuf, String)],
        mount_own: impl Fn(&str, &str, &Path) -> Result<PathBuf, CgroupError>,
    ) -> Result<Hierarchy, CgroupError> {
        let mut v1 = vec![];
        let mut v2_path = None;
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let rel = PathBuf::from(path.trim_start_matches('/'));
            if ctrls.is_empty() {
                v2_path = Some(rel);
                continue;
            }
            let names: Vec<&str> = ctrls.split(',').collect();
            if let Some(c) = names.iter().find(|c| V1_CONTROLLERS.contains(c)) {
                v1.push((c.to_string(), ctrls.to_string(), rel));
            }
        }
        if !v1.is_empty() {
            let mut controllers = vec![];
            for (name, option, rel) in v1 {
                let mount = mounts
                    .iter()
                    .find(|(fs, _, opts)| fs == "cgroup" && opts.split(',').any(|o| o == name))
                    .map(|(_, at, _)| at.clone());
                let mount = match mount {
                    Some(m) => m,
                    None => mount_own("cgroup", &option, &Path::new(OWN_MOUNTS).join(&option))?,
                };
                controllers.push((name, mount, rel));
            }
            return Ok(Hierarchy::V1 { controllers });
        }
        let own = v2_path.ok_or_else(|| CgroupError::Unavailable("/proc/self/cgroup names none".into()))?;
        let mount = match mounts.iter().find(|(fs, _, _)| fs == "cgroup2") {
            Some((_, at, _)) if at.join("cgroup.controllers").exists() => at.clone(),
            _ => mount_own("cgroup2", "", &Path::new(OWN_MOUNTS).join("unified"))?,
        };
        Ok(Hierarchy::V2 { mount, own })
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V2 { .. } => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }

    /// Makes the VM's cgroup (or cgroups, one per v1 controller) with `limits` set. A limit a controller
    /// does not offer here (blkio weight without a weight-aware I/O scheduler) is left out and listed in
    /// `VmCgroup::unsupported`.
    pub fn create(&self, vm_id: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let mut cg = VmCgroup { dirs: vec![], unsupported: vec![], version: self.version() };
        let made = self.create_inner(vm_id, limits, &mut cg);
        if let Err(e) = made {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn create_inner(&self, vm_id: &str, limits: Limits, cg: &mut VmCgroup) -> Result<(), CgroupError> {
        match self {
            Hierarchy::V1 { controllers } => {
                for (name, mount, own) in controllers {
                    let parent = mount.join(own).join("banger");
                    mkdir(&parent)?;
                    let dir = parent.join(vm_id);
                    mkdir(&dir)?;
                    cg.dirs.push(dir.clone());
                    match name.as_str() {
                        "memory" => {
                            write(&dir, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?;
                            // Swap too, where swap accounting is on: the limit must not move to swap.
                            let _ = write(&dir, "memory.memsw.limit_in_bytes", &limits.memory_bytes.to_string());
                        }
                        "cpu" => {
                            write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                            write(&dir, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
                            // v1's shares are 1024 for a default cgroup where v2's weight is 100.
                            write(&dir, "cpu.shares", &(limits.cpu_weight * 1024 / 100).to_string())?;
                        }
                        "pids" => write(&dir, "pids.max", &limits.pids.to_string())?,
                        "blkio" => {
                            let weight = ["blkio.weight", "blkio.bfq.weight"]
                                .iter()
                                .find(|f| dir.join(f).exists())
                                .map(|f| write(&dir, f, &IO_WEIGHT.to_string()));
                            match weight {
                                Some(r) => r?,
                                None => cg.unsupported.push("io weight (no weight-aware I/O scheduler)".into()),
                            }
                        }
                        _ => {}
                    }
                }
            }
            Hierarchy::V2 { mount, own } => {
                let base = mount.join(own);
                let parent = base.join("banger");
                mkdir(&parent)?;
                let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
                let wanted: Vec<&str> =
                    V2_CONTROLLERS.iter().copied().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
                for c in V2_CONTROLLERS.iter().filter(|c| !wanted.contains(c)) {
                    cg.unsupported.push(format!("{c} (controller not delegated to the daemon's cgroup)"));
                }
                let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                for at in [&base, &parent] {
                    if let Err(e) = write(at, "cgroup.subtree_control", enable.trim()) {
                        // A cgroup with processes in it cannot pass controllers down (v2's "no internal
                        // processes"): move the daemon into a leaf of its own first, as systemd expects of a
                        // service that delegates.
                        if at == &base && base != *mount {
                            let leaf = base.join("bangerd");
                            mkdir(&leaf)?;
                            write(&leaf, "cgroup.procs", &std::process::id().to_string())?;
                            write(at, "cgroup.subtree_control", enable.trim())?;
                        } else {
                            return Err(e);
                        }
                    }
                }
                let dir = parent.join(vm_id);
                mkdir(&dir)?;
                cg.dirs.push(dir.clone());
                if wanted.contains(&"memory") {
                    write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                    let _ = write(&dir, "memory.swap.max", "0");
                }
                if wanted.contains(&"cpu") {
                    write(&dir, "cpu.max", &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us))?;
                    write(&dir, "cpu.weight", &limits.cpu_weight.to_string())?;
                }
                if wanted.contains(&"pids") {
                    write(&dir, "pids.max", &limits.pids.to_string())?;
                }
                if wanted.contains(&"io") && write(&dir, "io.weight", &format!("default {IO_WEIGHT}")).is_err() {
                    cg.unsupported.push("io weight (no weight-aware I/O scheduler)".into());
                }
            }
        }
        Ok(())
    }

    /// The limits a VM's cgroup files hold; `None` if it has no cgroup (not running, or not contained).
    pub fn enforced(&self, vm_id: &str) -> Option<Enforced> {
        let dirs = self.dirs_of(vm_id);
        if !dirs.iter().any(|d| d.exists()) {
            return None;
        }
        let read = |file: &str| dirs.iter().map(|d| d.join(file)).find_map(|f| std::fs::read_to_string(f).ok());
        let number = |file: &str| read(file).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
        let percent = |quota: Option<u64>, period: Option<u64>| {
            quota.zip(period).filter(|(_, p)| *p > 0).map(|(q, p)| q * 100 / p)
        };
        Some(match self {
            Hierarchy::V1 { .. } => Enforced {
                memory_bytes: number("memory.limit_in_bytes"),
                cpu_percent: percent(number("cpu.cfs_quota_us"), number("cpu.cfs_period_us")),
                pids: number("pids.max"),
            },
            Hierarchy::V2 { .. } => Enforced {
                memory_bytes: number("memory.max"),
                cpu_percent: read("cpu.max").and_then(|v| {
                    let mut f = v.split_whitespace();
                    percent(f.next()?.parse().ok(), f.next()?.parse().ok())
                }),
                pids: number("pids.max"),
            },
        })
    }

    /// Changes the CPU quota of a running VM's cgroup (the controller applies it at once).
    pub fn set_cpu_quota(&self, vm_id: &str, quota_us: u64) -> Result<(), CgroupError> {
        let dir = match self {
            Hierarchy::V1 { controllers } => controllers
                .iter()
                .find(|(name, _, _)| name == "cpu")
                .map(|(_, mount, own)| (mount.join(own).join("banger").join(vm_id), "cpu.cfs_quota_us")),
            Hierarchy::V2 { mount, own } => Some((mount.join(own).join("banger").join(vm_id), "cpu.max")),
        };
        let Some((dir, file)) = dir.filter(|(d, f)| d.join(f).exists()) else {
            return Err(CgroupError::Unavailable(format!("VM {vm_id} has no CPU cgroup")));
        };
        match file {
            "cpu.max" => write(&dir, file, &format!("{quota_us} {CPU_PERIOD_US}")),
            _ => write(&dir, file, &quota_us.to_string()),
        }
    }

    /// Every process in a VM's cgroups (its VMM, its helpers, and whatever they started): all of them the
    /// VM's, whatever their command lines say now.
    pub fn processes_of(&self, vm_id: &str) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs_of(vm_id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The cgroup folders a VM's processes would be in (whether or not they exist).
    pub fn dirs_of(&self, vm_id: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V1 { controllers } => {
                controllers.iter().map(|(_, mount, own)| mount.join(own).join("banger").join(vm_id)).collect()
            }
            Hierarchy::V2 { mount, own } => vec![mount.join(own).join("banger").join(vm_id)],
        }
    }
}

/// A VM's cgroups. Removed once its processes are gone (`remove`, by `stop_vm_processes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
    pub unsupported: Vec<String>,
    pub version: u8,
}

impl VmCgroup {
    /// The `cgroup.procs` files a process joins.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn remove(&self) {
        remove_dirs(&self.dirs);
    }
}

/// Removes VM cgroup folders (an empty cgroup's folder is removed with rmdir; one with processes left is not).
pub fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("creating", dir)(e)),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io("writing", &path))
}

/// The cgroup file systems mounted here: (type, mount point, options).
fn mounts() -> Vec<(String, PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2].starts_with("cgroup"))
                .then(|| (f[2].to_string(), PathBuf::from(f[1]), f[3].to_string()))
        })
        .collect()
}

fn mount_own(fstype: &str, options: &str, at: &Path) -> Result<PathBuf, CgroupError> {
    // Mounted once per daemon namespace: a second daemon in the same one finds it in /proc/self/mounts.
    std::fs::create_dir_all(at).map_err(io("creating", at))?;
    let data = (!options.is_empty()).then_some(options);
    nix::mount::mount(Some(fstype), at, Some(fstype), nix::mount::MsFlags::empty(), data)
        .map_err(|e| io("mounting a cgroup hierarchy on", at)(std::io::Error::from(e)))?;
    Ok(at.to_path_buf())
}

/// What `banger doctor` says about this host's cgroups.
pub fn describe() -> Result<String, CgroupError> {
    let h = Hierarchy::detect()?;
    Ok(match &h {
        Hierarchy::V2 { mount, own } => {
            let available = std::fs::read_to_string(mount.join(own).join("cgroup.controllers")).unwrap_or_default();
            format!("cgroup v2 at {} (controllers: {})", mount.display(), available.trim())
        }
        Hierarchy::V1 { controllers } => format!(
            "cgroup v1 ({})",
            controllers.iter().map(|(c, m, _)| format!("{c} at {}", m.display())).collect::<Vec<_>>().join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_shape() {
        let l = Limits::for_shape(2, 512);
        assert_eq!(l.memory_bytes, (512 + 256) << 20);
        assert_eq!(l.cpu_quota_us, 250_000);
        assert_eq!(l.cpu_weight, 200);
        assert_eq!(l.pids, PIDS_MAX);
    }

    #[test]
    fn v1_and_v2_layouts_are_read_from_proc() {
        let mounts = vec![
            ("cgroup".to_string(), PathBuf::from("/sys/fs/cgroup/memory"), "rw,memory".to_string()),
            ("cgroup".to_string(), PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"), "rw,cpu,cpuacct".to_string()),
            ("cgroup".to_string(), PathBuf::from("/sys/fs/cgroup/pids"), "rw,pids".to_string()),
            ("cgroup".to_string(), PathBuf::from("/sys/fs/cgroup/blkio"), "rw,blkio".to_string()),
        ];
        let own = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n4:memory:/sandbox/x\n1:cpu,cpuacct:/\n0::/\n";
        let h = Hierarchy::from_proc(own, &mounts, mount_own).unwrap();
        let Hierarchy::V1 { controllers } = &h else { panic!("{h:?}") };
        let names: Vec<&str> = controllers.iter().map(|(c, _, _)| c.as_str()).collect();
        assert_eq!(names, ["pids", "blkio", "memory", "cpu"]);
        assert_eq!(h.dirs_of("v")[2], PathBuf::from("/sys/fs/cgroup/memory/sandbox/x/banger/v"));
        assert_eq!(h.dirs_of("v")[3], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/banger/v"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let v2 = vec![("cgroup2".to_string(), dir.path().to_path_buf(), "rw".to_string())];
        let h = Hierarchy::from_proc("0::/system.slice/bangerd.service\n", &v2, mount_own).unwrap();
        assert_eq!(h.dirs_of("v"), [dir.path().join("system.slice/bangerd.service/banger/v")]);
    }
}
