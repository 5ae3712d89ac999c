//! Which VMM runs guests on this host (the host facts themselves are `banger_vmm::host`'s).
use tools_schema::daemon::{Acceleration, VmmChoice, VmmKind};

use crate::config::Config;
pub use banger_vmm::host::{acceleration, process_matches, process_uid, qemu_accel, status_field, tsc_khz};

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
    let qemu_accel = qemu_accel(accel);
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
                    assert_eq!(c.qemu_accel, qemu_accel(accel));
                    assert_eq!(
                        c.qemu_accel == tools_schema::daemon::QemuAccel::Kvm,
                        accel == Acceleration::HardwareKvm
                    );
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
