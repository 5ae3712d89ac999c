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

/// Picks the VMM for new VMs: the configured one if set, Firecracker on hardware KVM when its binary is
/// installed, QEMU otherwise (KVM-accelerated on hardware KVM, TCG software emulation elsewhere).
pub fn choose_vmm(cfg: &Config) -> VmmChoice {
    let accel = acceleration();
    let qemu_accel = if accel == Acceleration::HardwareKvm { "kvm" } else { "tcg" }.to_string();
    let have_fc = cfg.find_binary("firecracker").is_some();
    let (vmm, reason) = match (cfg.vmm, accel) {
        (Some(v), _) => (v, format!("the config file sets vmm = \"{}\"", v.as_str())),
        (None, Acceleration::HardwareKvm) if have_fc => {
            (VmmKind::Firecracker, "hardware KVM is available and Firecracker is installed".to_string())
        }
        (None, Acceleration::HardwareKvm) => {
            (VmmKind::Qemu, "hardware KVM is available but Firecracker is not installed; QEMU uses KVM".to_string())
        }
        (None, Acceleration::ParavirtKvm) => (
            VmmKind::Qemu,
            "/dev/kvm is paravirtual (kvm_pvm, no vmx/svm CPU flag): ordinary guest kernels cannot boot on it, \
             so guests run under QEMU with software emulation (TCG)"
                .to_string(),
        ),
        (None, Acceleration::None) => {
            (VmmKind::Qemu, "no KVM on this host: guests run under QEMU with software emulation (TCG)".to_string())
        }
    };
    VmmChoice { vmm, qemu_accel, acceleration: accel, reason }
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
