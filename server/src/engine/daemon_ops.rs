//! daemon.ping, daemon.status, doctor.run.
use std::path::Path;
use std::sync::Arc;

use tools_schema::daemon::{
    CheckStatus, DaemonStatus, DoctorCheck, DoctorParams, DoctorReport, Empty, HostStatus, PingResult,
};
use tools_schema::vm::VmState;
use tools_schema::{ApiError, BuildInfo};

use super::{CallContext, Engine};

impl Engine {
    pub async fn daemon_ping(self: &Arc<Self>, _: Empty, _: CallContext) -> Result<PingResult, ApiError> {
        Ok(PingResult {
            build: BuildInfo::current(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
        })
    }

    pub async fn daemon_status(self: &Arc<Self>, _: Empty, _: CallContext) -> Result<DaemonStatus, ApiError> {
        let vms = self.store.vms().await?;
        let images = self.store.images().await?;
        Ok(DaemonStatus {
            build: BuildInfo::current(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            socket: self.cfg.socket.display().to_string(),
            state_dir: self.cfg.state_dir.display().to_string(),
            log_file: Some(self.cfg.log_file().display().to_string()),
            vmm: self.vmm().clone(),
            vms_total: vms.len() as u32,
            vms_running: vms.iter().filter(|v| v.state == VmState::Running).count() as u32,
            images: images.len() as u32,
            ssh_key: self.cfg.ssh_key().display().to_string(),
            web_url: self.web_url.get().cloned(),
            warm_pool: self.warm_pool_status().await,
            limits: self.limits_status(&vms),
            host: host_status(&self.cfg.state_dir),
        })
    }

    pub async fn doctor_run(self: &Arc<Self>, p: DoctorParams, _: CallContext) -> Result<DoctorReport, ApiError> {
        let vmm = self.vmm();
        let mut checks: Vec<DoctorCheck> = super::doctor::host_requirements()
            .map(|req| {
                // `need` is "always" or the name of the VMM that needs the program.
                let required = req.need == "always" || req.need == vmm.vmm.as_str();
                self.binary_check(&req, required)
            })
            .collect();
        checks.push(DoctorCheck {
            name: "kvm".into(),
            status: match vmm.acceleration {
                tools_schema::daemon::Acceleration::HardwareKvm => CheckStatus::Pass,
                _ => CheckStatus::Warn,
            },
            detail: format!("{:?}: {}", vmm.acceleration, vmm.reason),
            fix: match vmm.acceleration {
                tools_schema::daemon::Acceleration::HardwareKvm => None,
                _ => Some("guests still run (software emulation, slower); for full speed use a host with VT-x/AMD-V and load kvm_intel or kvm_amd".into()),
            },
        });
        checks.push(self.state_dir_check());
        checks.push(self.socket_check());
        let images = self.store.images().await?;
        checks.push(match images.iter().find(|i| i.is_default) {
            Some(img) => {
                let missing: Vec<&str> = [Some(img.kernel.as_str()), img.initrd.as_deref(), Some(img.rootfs.as_str())]
                    .into_iter()
                    .flatten()
                    .filter(|p| !Path::new(p).exists())
                    .collect();
                if missing.is_empty() {
                    DoctorCheck {
                        name: "default-image".into(),
                        status: CheckStatus::Pass,
                        detail: format!("{} ({})", img.name, img.fingerprint),
                        fix: None,
                    }
                } else {
                    DoctorCheck {
                        name: "default-image".into(),
                        status: CheckStatus::Fail,
                        detail: format!("image {} is missing files: {}", img.name, missing.join(", ")),
                        fix: Some(format!(
                            "delete and re-register it: banger image delete {} && scripts/quickstart.sh",
                            img.name
                        )),
                    }
                }
            }
            None => DoctorCheck {
                name: "default-image".into(),
                status: CheckStatus::Fail,
                detail: "no default image is registered, so `vm create` needs --image".into(),
                fix: Some("run scripts/quickstart.sh, or `banger image register ... --default`".into()),
            },
        });
        checks.extend(self.host_checks().await);
        checks.push(self.guest_sync_check());
        let boots = if p.boot { self.doctor_boots().await } else { vec![] };
        let ok =
            checks.iter().all(|c| c.status != CheckStatus::Fail) && boots.iter().all(|b| b.status != CheckStatus::Fail);
        // A boot self-test may have just proven Firecracker: report the choice as it is now.
        let vmm = if p.boot { self.vmm() } else { vmm };
        Ok(DoctorReport { checks, vmm, boots, ok })
    }

    /// One program of scripts/host-requirements.tsv: where it is and its version, or how to install it.
    fn binary_check(&self, req: &super::doctor::HostRequirement, required: bool) -> DoctorCheck {
        let Some(path) = self.cfg.find_binary(req.program) else {
            return DoctorCheck {
                name: req.program.into(),
                status: if required { CheckStatus::Fail } else { CheckStatus::Warn },
                detail: format!("not found in {:?} or PATH: {}", self.cfg.bin_dirs, req.why),
                fix: Some(req.fix()),
            };
        };
        let version = if req.version_arg == "-" {
            "present".to_string()
        } else {
            std::process::Command::new(&path)
                .arg(req.version_arg)
                .stdin(std::process::Stdio::null())
                .output()
                .ok()
                // Some tools print their version on stderr (mkfs.ext4 -V).
                .map(|o| {
                    let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                    String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
                })
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "present (no version printed)".into())
        };
        DoctorCheck {
            name: req.program.into(),
            status: CheckStatus::Pass,
            detail: format!("{} {version}", path.display()),
            fix: None,
        }
    }

    /// Which agent logins will reach guests at boot. Missing ones are a warning: guests work without them.
    fn guest_sync_check(&self) -> DoctorCheck {
        let sync = &self.cfg.guest_sync;
        let (found, missing): (Vec<_>, Vec<_>) =
            sync.auth_files.iter().map(|f| sync.host_path(f)).partition(|p| p.is_file());
        let show = |v: &[std::path::PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        DoctorCheck {
            name: "agent-logins".into(),
            status: if missing.is_empty() { CheckStatus::Pass } else { CheckStatus::Warn },
            detail: if missing.is_empty() {
                format!("copied into guests at boot: {}", show(&found))
            } else {
                format!("not found, so guests start logged out of: {} (found: {})", show(&missing), show(&found))
            },
            fix: (!missing.is_empty()).then(|| {
                format!(
                    "log in on the host (claude, opencode auth login, pi) as the user whose home is {}, or set \
                     guest_sync.home in the config",
                    sync.home().display()
                )
            }),
        }
    }

    fn state_dir_check(&self) -> DoctorCheck {
        let dir = &self.cfg.state_dir;
        match nix::sys::statvfs::statvfs(dir) {
            Ok(st) => {
                let free = st.blocks_available() * st.fragment_size();
                let gib = free as f64 / (1u64 << 30) as f64;
                // Every VM's writes and every image build land here.
                let status = match free {
                    f if f < 1 << 30 => CheckStatus::Fail,
                    f if f < 10 << 30 => CheckStatus::Warn,
                    _ => CheckStatus::Pass,
                };
                DoctorCheck {
                    name: "state-dir".into(),
                    detail: format!("{} ({gib:.1} GiB free)", dir.display()),
                    fix: (status != CheckStatus::Pass).then(|| {
                        "free disk space there (every VM's writes and image builds land in it), or move state_dir \
                         in the config to a bigger filesystem"
                            .into()
                    }),
                    status,
                }
            }
            Err(e) => DoctorCheck {
                name: "state-dir".into(),
                status: CheckStatus::Fail,
                detail: format!("{}: {e}", dir.display()),
                fix: Some("create it, or set state_dir in the config file".into()),
            },
        }
    }

    fn socket_check(&self) -> DoctorCheck {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&self.cfg.socket) {
            Ok(m) => {
                let mode = m.permissions().mode() & 0o777;
                let open = mode & 0o007 != 0;
                DoctorCheck {
                    name: "socket".into(),
                    status: if open { CheckStatus::Fail } else { CheckStatus::Pass },
                    detail: format!(
                        "{} mode {mode:o}; peers are also checked by credentials",
                        self.cfg.socket.display()
                    ),
                    fix: open.then(|| "restart bangerd: it creates the socket private to its owner".into()),
                }
            }
            Err(e) => DoctorCheck {
                name: "socket".into(),
                status: CheckStatus::Fail,
                detail: format!("{}: {e}", self.cfg.socket.display()),
                fix: Some("start the daemon: banger daemon start".into()),
            },
        }
    }
}

/// The host's load (procfs) and the state directory's filesystem (statvfs), read now.
fn host_status(state_dir: &Path) -> HostStatus {
    use procfs::Current;
    let load = procfs::LoadAverage::current().ok().map(|l| [l.one as f64, l.five as f64, l.fifteen as f64]);
    let disk = nix::sys::statvfs::statvfs(state_dir).ok().map(|s| {
        let frag = s.fragment_size();
        (s.blocks() * frag, s.blocks_available() * frag)
    });
    HostStatus {
        load_average: load,
        state_disk_total_bytes: disk.map(|d| d.0),
        state_disk_free_bytes: disk.map(|d| d.1),
    }
}
