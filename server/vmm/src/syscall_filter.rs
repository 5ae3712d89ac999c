//! A seccomp filter of banger's own, for the VM's host processes that bring none (vhost-device-vsock; QEMU
//! has `-sandbox`, Firecracker its built-in filters). A deny-list: the helper's own syscalls are not
//! enumerated (an allow-list would break with each of its releases), but what a compromised helper would use
//! to climb out of its jail is refused: namespaces and mounts, tracing and other processes' memory, kernel
//! modules and kexec, BPF and perf, the kernel keyring, userfaultfd, io_uring (which runs syscalls seccomp
//! never sees), and the odd host-wide knobs (reboot, swap, accounting, syslog, port I/O).
//!
//! Compiled by `seccompiler` (Firecracker's) before the jail's fork; the child only installs it.
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Refused with EPERM, whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_quotactl,
    libc::SYS_personality,
];

#[derive(Debug, thiserror::Error)]
#[error("building the helpers' seccomp filter: {0}")]
pub struct FilterError(String);

/// The x32 ABI's bit in a syscall number: x32 calls reach the same kernel code under numbers no x86_64 filter
/// names, so a deny-list must refuse them all (seccompiler checks only the architecture, which x32 shares).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Refuses (EPERM) every syscall number with the x32 bit; allows the rest to the next filter.
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K (linux/bpf_common.h).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    let nr_offset = 0; // offsetof(struct seccomp_data, nr)
    vec![
        sock_filter { code: BPF_LD_W_ABS, jt: 0, jf: 0, k: nr_offset },
        sock_filter { code: BPF_JMP_JGE_K, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        sock_filter { code: BPF_RET_K, jt: 0, jf: 0, k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32 },
        sock_filter { code: BPF_RET_K, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
    ]
}

/// The filters a helper runs under, in the order they are installed. Three, because seccomp has one action
/// per filter (the strictest answer of all of them wins): x32 numbers refused (`no_x32`); `clone3`, whose
/// flags a filter cannot read, failing with ENOSYS (so the C library falls back to `clone`, whose flags it
/// can); and everything above with EPERM.
pub fn helper_filters() -> Result<Vec<BpfProgram>, FilterError> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e| FilterError(format!("{e:?}")))?;
    let err = |e: seccompiler::BackendError| FilterError(e.to_string());
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|n| (*n, vec![])).collect();
    // `clone` is refused when any namespace flag is set: one rule per flag, any of which refuses it.
    let any_namespace = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ]
    .iter()
    .map(|flag| {
        let flag = *flag as u64;
        SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(err)
    })
    .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, any_namespace);
    let eperm = SeccompFilter::new(denied, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
        .map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    let mut filters = vec![no_x32()];
    for f in [eperm, clone3] {
        filters.push(BpfProgram::try_from(f).map_err(|e| FilterError(e.to_string()))?);
    }
    Ok(filters)
}

/// Installs one compiled filter on the calling thread (NoNewPrivs must be set). System calls only: the
/// jail's child calls it.
///
/// # Safety
/// Only a raw syscall on memory the caller owns.
pub unsafe fn install(program: &BpfProgram) -> libc::c_long {
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
    libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog)
}
