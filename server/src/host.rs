//! Facts about the host: what kind of KVM it has and therefore which VMM runs guests.
use std::path::Path;

use tools_schema::daemon::{Acceleration, VmmChoice, VmmKind};

use crate::config::Config;

/// Classifies the host's virtualisation. `/dev/kvm` alone proves nothing: the paravirtual `kvm_pvm`
/// module provides it too, and ordinary guest kernels die on it mid-boot.
pub fn acceleration() -> Acceleration {
    let kvm_dev = Path::new("/dev/kvm").exists();
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_flag = cpu_flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if kvm_dev && (module("kvm_intel") || module("kvm_amd")) && hw_flag {
        Acceleration::HardwareKvm
    } else if kvm_dev {
        Acceleration::ParavirtKvm
    } else {
        Acceleration::None
    }
}

/// What this host has shown of Firecracker: a guest booted by the current banger build, kernel and
/// Firecracker binary (the boot self-test, recorded in the store), or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirecrackerProof {
    /// The firecracker binary is not installed.
    NotInstalled,
    /// Installed, but no boot self-test with these inputs has finished yet.
    Unproven,
    Passed,
    /// The self-test with these inputs failed, and why.
    Failed(String),
}

/// Picks the VMM for new VMs: the configured one if set; Firecracker only on hardware KVM and only once its
/// boot self-test has passed on this host with the current inputs; QEMU otherwise (KVM-accelerated on
/// hardware KVM, TCG software emulation elsewhere). A VMM that was never seen to boot a guest here is not
/// trusted with the user's first VM.
pub fn choose_vmm(configured: Option<VmmKind>, accel: Acceleration, firecracker: &FirecrackerProof) -> VmmChoice {
    let qemu_accel = qemu_accel(accel).to_string();
    let (vmm, reason) = match (configured, accel, firecracker) {
        (Some(v), _, _) => (v, format!("the config file sets vmm = \"{}\"", v.as_str())),
        (None, Acceleration::HardwareKvm, FirecrackerProof::Passed) => (
            VmmKind::Firecracker,
            "hardware KVM is available and Firecracker's boot self-test passed on this host with this banger \
             build, kernel and Firecracker binary"
                .to_string(),
        ),
        (None, Acceleration::HardwareKvm, FirecrackerProof::Unproven) => (
            VmmKind::Qemu,
            "Firecracker not yet proven on this host: its boot self-test runs in the background, and until it \
             passes QEMU runs guests with KVM"
                .to_string(),
        ),
        (None, Acceleration::HardwareKvm, FirecrackerProof::Failed(why)) => (
            VmmKind::Qemu,
            format!(
                "Firecracker's boot self-test failed on this host ({why}); QEMU runs guests with KVM. \
                 `banger doctor --boot` tries again"
            ),
        ),
        (None, Acceleration::HardwareKvm, FirecrackerProof::NotInstalled) => {
            (VmmKind::Qemu, "hardware KVM is available but Firecracker is not installed; QEMU uses KVM".to_string())
        }
        (None, Acceleration::ParavirtKvm, _) => (
            VmmKind::Qemu,
            "/dev/kvm is paravirtual (kvm_pvm, no vmx/svm CPU flag): ordinary guest kernels cannot boot on it, \
             so guests run under QEMU with software emulation (TCG)"
                .to_string(),
        ),
        (None, Acceleration::None, _) => {
            (VmmKind::Qemu, "no KVM on this host: guests run under QEMU with software emulation (TCG)".to_string())
        }
    };
    VmmChoice { vmm, qemu_accel, acceleration: accel, reason }
}

/// How QEMU runs guests on a host like this: with KVM on hardware KVM, else software emulation.
pub fn qemu_accel(accel: Acceleration) -> &'static str {
    if accel == Acceleration::HardwareKvm {
        "kvm"
    } else {
        "tcg"
    }
}

/// Whether Firecracker could run guests here at all, and if not, why (said by doctor's boot self-test).
pub fn firecracker_unrunnable(cfg: &Config, accel: Acceleration) -> Option<String> {
    if accel != Acceleration::HardwareKvm && !cfg.allow_firecracker_without_hardware_kvm {
        return Some(format!(
            "not tried: Firecracker needs hardware KVM and this host has {accel:?} ({})",
            match accel {
                Acceleration::ParavirtKvm => "/dev/kvm is the paravirtual kvm_pvm, no vmx/svm CPU flag",
                _ => "no /dev/kvm",
            }
        ));
    }
    cfg.find_binary("firecracker").is_none().then(|| "not tried: Firecracker is not installed".to_string())
}

/// The host TSC frequency in kHz. Software-emulated guests need it on their command line
/// (`tsc_early_khz`), or most TCG boots hang calibrating the timer.
pub fn tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse() {
            return Some(v);
        }
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Whether a process is alive and its command line contains `marker` (guards against pid reuse).
pub fn process_matches(pid: u32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains(marker) && !is_zombie(pid)
        }
        Err(_) => false,
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of config, host and Firecracker proof: Firecracker is chosen on its own only when
    /// hardware KVM is there and its self-test passed; the config always wins.
    #[test]
    fn the_vmm_choice_trusts_only_a_proven_firecracker() {
        let proofs = [
            FirecrackerProof::NotInstalled,
            FirecrackerProof::Unproven,
            FirecrackerProof::Passed,
            FirecrackerProof::Failed("the guest never answered".into()),
        ];
        for configured in [None, Some(VmmKind::Qemu), Some(VmmKind::Firecracker)] {
            for accel in [Acceleration::HardwareKvm, Acceleration::ParavirtKvm, Acceleration::None] {
                for proof in &proofs {
                    let c = choose_vmm(configured, accel, proof);
                    let want = match (configured, accel, proof) {
                        (Some(v), _, _) => v,
                        (None, Acceleration::HardwareKvm, FirecrackerProof::Passed) => VmmKind::Firecracker,
                        _ => VmmKind::Qemu,
                    };
                    assert_eq!(c.vmm, want, "{configured:?} {accel:?} {proof:?}: {}", c.reason);
                    assert_eq!(c.qemu_accel, if accel == Acceleration::HardwareKvm { "kvm" } else { "tcg" });
                    if configured.is_none() && accel == Acceleration::HardwareKvm {
                        let says = match proof {
                            FirecrackerProof::Unproven => "not yet proven on this host",
                            FirecrackerProof::Failed(_) => "the guest never answered",
                            FirecrackerProof::Passed => "self-test passed",
                            FirecrackerProof::NotInstalled => "not installed",
                        };
                        assert!(c.reason.contains(says), "{proof:?}: {}", c.reason);
                    }
                }
            }
        }
    }
}
