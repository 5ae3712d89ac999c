//! Host checks for `doctor.run` beyond binaries and images: the VM network (TUN, bridge, nftables, DNS), the
//! guest channel's backend and the guest kernel for image builds. Each check says what it found
//! and, when it is not a pass, the fix.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tools_schema::daemon::{CheckStatus, DoctorCheck};

use super::Engine;

/// One program banger needs, from `scripts/host-requirements.tsv`: the one list that `scripts/setup-host.sh`
/// checks when it ends and `doctor.run` reports on, so the two can never disagree.
pub(crate) struct HostRequirement {
    pub program: &'static str,
    /// `always`, `qemu`, `firecracker` (needed when that VMM runs guests) or `optional`.
    pub need: &'static str,
    /// The argument that prints its version, or `-`.
    pub version_arg: &'static str,
    /// An apt package, or `setup` for a step of setup-host.sh.
    pub package: &'static str,
    pub why: &'static str,
}

impl HostRequirement {
    pub fn fix(&self) -> String {
        match self.package {
            "setup" => format!("run scripts/setup-host.sh (it installs {} from the package registries)", self.program),
            pkg => format!("apt-get install {pkg} (scripts/setup-host.sh installs it)"),
        }
    }
}

const HOST_REQUIREMENTS: &str = include_str!("../../../scripts/host-requirements.tsv");

pub(crate) fn host_requirements() -> impl Iterator<Item = HostRequirement> {
    HOST_REQUIREMENTS.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(|line| {
        let mut cols = line.split('\t');
        let mut col = || cols.next().unwrap_or("");
        HostRequirement { program: col(), need: col(), version_arg: col(), package: col(), why: col() }
    })
}

fn check(name: &str, status: CheckStatus, detail: impl Into<String>, fix: Option<&str>) -> DoctorCheck {
    DoctorCheck { name: name.into(), status, detail: detail.into(), fix: fix.map(str::to_string) }
}

impl Engine {
    /// What the host can take (`[limits]`): warns when the promise is past the budget (the budget was
    /// lowered) or the budget leaves no room for one default VM.
    async fn capacity_check(&self) -> DoctorCheck {
        let rows = self.store.vms().await.unwrap_or_default();
        let l = self.limits_status(&rows);
        let room = l.memory_budget_mib.saturating_sub(l.memory_promised_mib);
        if room < self.cfg.default_memory_mib as u64 {
            check(
                "capacity",
                CheckStatus::Warn,
                format!("{}: no room for another {} MiB VM", l.summary(), self.cfg.default_memory_mib),
                Some("stop or delete VMs, or raise [limits] memory_overcommit_ratio / memory_mib in the config"),
            )
        } else {
            check("capacity", CheckStatus::Pass, l.summary(), None)
        }
    }

    pub(crate) async fn host_checks(&self) -> Vec<DoctorCheck> {
        let mut checks = vec![self.vsock_check(), self.guest_kernel_check(), self.capacity_check().await];
        checks.extend(self.containment_checks());
        if !self.cfg.network.enabled {
            checks.push(check(
                "network",
                CheckStatus::Warn,
                "disabled in the config: VMs get no network (they are still managed over the guest channel)",
                Some("set [network] enabled = true"),
            ));
            return checks;
        }
        checks.push(if Path::new("/dev/net/tun").exists() {
            check("tun", CheckStatus::Pass, "/dev/net/tun", None)
        } else {
            check(
                "tun",
                CheckStatus::Fail,
                "/dev/net/tun is missing: VMs cannot get network devices",
                Some("modprobe tun"),
            )
        });
        match self.network() {
            None => checks.push(check(
                "bridge",
                CheckStatus::Fail,
                format!("the VM network ({}) is not up; the daemon log says why", self.cfg.network.bridge),
                Some("check `banger daemon status` for the log file, fix the cause and restart the daemon"),
            )),
            Some(net) => {
                let up = std::fs::read_to_string(format!("/sys/class/net/{}/operstate", net.bridge)).is_ok();
                checks.push(if up {
                    check(
                        "bridge",
                        CheckStatus::Pass,
                        format!("{} with gateway {}/{}", net.bridge, net.gateway, net.subnet.prefix()),
                        None,
                    )
                } else {
                    check(
                        "bridge",
                        CheckStatus::Fail,
                        format!("bridge {} has gone away", net.bridge),
                        Some("restart the daemon (it recreates the bridge)"),
                    )
                });
                checks.push(self.nftables_check().await);
                checks.push(dns_check(net.gateway).await);
            }
        }
        checks
    }

    /// The guest channel's backend: virtio-serial needs nothing; vsock under QEMU needs vhost-device-vsock.
    fn vsock_check(&self) -> DoctorCheck {
        if self.cfg.qemu_channel != tools_schema::boot::ChannelKind::Vsock {
            return check(
                "guest-channel",
                CheckStatus::Pass,
                "QEMU guests use virtio-serial (no helper needed); Firecracker guests use its built-in hybrid vsock",
                None,
            );
        }
        match self.cfg.find_binary("vhost-device-vsock") {
            Some(p) => check("guest-channel", CheckStatus::Pass, format!("vsock through {}", p.display()), None),
            None => check(
                "guest-channel",
                CheckStatus::Fail,
                format!(
                    "qemu_channel = \"vsock\" needs vhost-device-vsock, not found in {:?} or PATH",
                    self.cfg.bin_dirs
                ),
                Some("run scripts/setup-host.sh (installs it), or set qemu_channel = \"virtio-serial\""),
            ),
        }
    }

    fn guest_kernel_check(&self) -> DoctorCheck {
        let (kernel, _, initrd) = self.cfg.build_kernel();
        let missing: Vec<String> = std::iter::once(&kernel)
            .chain(initrd.as_ref())
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            check("guest-kernel", CheckStatus::Pass, format!("{} (for image builds)", kernel.display()), None)
        } else {
            check(
                "guest-kernel",
                CheckStatus::Warn,
                format!("image builds from recipes need {}", missing.join(" and ")),
                Some("run scripts/setup-host.sh (it builds the lean kernel), or set kernel in the config"),
            )
        }
    }

    async fn nftables_check(&self) -> DoctorCheck {
        let Some(nft) = self.cfg.find_binary("nft") else {
            return check(
                "nftables",
                CheckStatus::Fail,
                "nft not found: NAT and guest isolation need it",
                Some("apt-get install nftables"),
            );
        };
        let out = tokio::process::Command::new(&nft).args(["list", "table", "inet", "banger"]).output().await;
        // The per-TAP filters (a TAP carries only its VM's MAC and addresses) live in the bridge table.
        let bridge = tokio::process::Command::new(&nft).args(["list", "table", "bridge", "banger"]).output().await;
        let guarded = match &bridge {
            Ok(b) if b.status.success() => String::from_utf8_lossy(&b.stdout).matches("jump tap_").count(),
            _ => {
                return check(
                    "nftables",
                    CheckStatus::Fail,
                    "table bridge banger (the per-TAP address filters) is missing",
                    Some("restart the daemon (it installs the table); check that the nf_tables_bridge module loads"),
                )
            }
        };
        match out {
            Ok(o) if o.status.success() => {
                let rules = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("accept") || l.contains("drop") || l.contains("masquerade"))
                    .count();
                let text =
                    format!("table inet banger with {rules} rules; table bridge banger filtering {guarded} TAPs");
                check("nftables", CheckStatus::Pass, text, None)
            }
            Ok(o) => check(
                "nftables",
                CheckStatus::Fail,
                format!("banger's table is missing: {}", String::from_utf8_lossy(&o.stderr).trim()),
                Some("restart the daemon (it installs the table); check that the nf_tables module loads"),
            ),
            Err(e) => {
                check("nftables", CheckStatus::Fail, format!("cannot run nft: {e}"), Some("apt-get install nftables"))
            }
        }
    }
}

/// Asks banger's DNS server on the gateway for a name under `vm.`: any answer means it is serving.
async fn dns_check(gateway: Ipv4Addr) -> DoctorCheck {
    // A minimal DNS query: id 0xb46e, recursion desired, one question `doctor-probe.vm. IN A`.
    let mut q = vec![0xb4, 0x6e, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["doctor-probe", "vm"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let server = SocketAddr::from((gateway, 53));
    let answered = async {
        let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()?;
        sock.send_to(&q, server).await.ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).await.ok()?;
        (n >= 12 && buf[..2] == q[..2]).then_some(())
    };
    match tokio::time::timeout(Duration::from_secs(2), answered).await {
        Ok(Some(())) => check("dns", CheckStatus::Pass, format!("<name>.vm answered by {server}"), None),
        _ => check(
            "dns",
            CheckStatus::Fail,
            format!("no answer from banger's DNS at {server}"),
            Some("restart the daemon; check that nothing else holds port 53 on the bridge address"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_requirements_list_is_well_formed() {
        let reqs: Vec<_> = host_requirements().collect();
        assert!(reqs.len() >= 8, "the list lost rows");
        for r in &reqs {
            assert!(
                ["always", "qemu", "firecracker", "optional"].contains(&r.need),
                "{}: need {:?}",
                r.program,
                r.need
            );
            assert!(
                !r.version_arg.is_empty() && !r.package.is_empty() && !r.why.is_empty(),
                "{}: a column is empty",
                r.program
            );
        }
        for needed in ["qemu-img", "qemu-system-x86_64", "mkfs.ext4", "git", "firecracker"] {
            assert!(reqs.iter().any(|r| r.program == needed), "{needed} is not in the list");
        }
    }

    #[test]
    fn setup_host_checks_the_same_list() {
        let setup = include_str!("../../../scripts/setup-host.sh");
        assert!(setup.contains("scripts/host-requirements.tsv"), "setup-host.sh no longer reads the shared list");
    }
}
