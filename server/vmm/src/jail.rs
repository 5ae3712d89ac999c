//! Containment for the processes a VM runs on the host (its VMM and its helpers).
//!
//! A contained process is started with `clone(CLONE_NEWNS | CLONE_NEWPID)`, so it is PID 1 of a PID
//! namespace of its own and has a mount namespace of its own, in which the child, before it runs the program:
//! joins the VM's cgroups; builds a new root on a tmpfs with only what the program needs bound in (read-only:
//! the system's program and library folders, the image's files; read-write: the VM's folder; a few device
//! nodes; its own `/proc`) at the same paths they have on the host, so its command line does not change;
//! `pivot_root`s into it and makes it read-only; drops every capability from its bounding set; takes the VM's
//! uid and gid (which empties its permitted and effective capabilities); sets `NoNewPrivs`; and keeps only the
//! file descriptors it was handed. What the program then adds itself (QEMU's `-sandbox`) comes on top.
//!
//! The child of a multi-threaded daemon may only make system calls until it `execve`s (another thread could
//! hold the allocator's lock), so everything it needs is prepared here first as C strings and plain fds, and
//! what fails is reported as a step number and an errno over a close-on-exec pipe: end of file means the
//! program runs.
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the new root of a VM's contained processes is mounted (in their mount namespace only: on the host
/// the folder stays empty). Removed with the VM's processes (`stop_vm_processes`).
pub fn root_for(vm_id: &str) -> PathBuf {
    Path::new("/run/banger-jails").join(vm_id)
}

/// Who a contained process runs as, and what it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The VM's own uid and gid (see `Identity`).
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group that may read images and templates, and `/dev/kvm`'s where it is used.
    pub groups: Vec<u32>,
    /// An empty folder the daemon owns, on which the new root is mounted (it stays empty on the host).
    pub root: PathBuf,
    /// What is bound into the new root, at the same path.
    pub binds: Vec<Bind>,
    /// `cgroup.procs` files the process joins before anything else.
    pub cgroups: Vec<PathBuf>,
    /// Who finishes the confinement once the root is built.
    pub finisher: Finisher,
    /// Run under banger's own seccomp filter (`syscall_filter`): for a program that brings none.
    pub syscall_filter: bool,
}

/// Who takes the process the rest of the way once its root is built and its cgroups joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finisher {
    /// This module: its own `/proc`, `pivot_root`, a read-only root, no capabilities, the VM's uid and gid,
    /// NoNewPrivs, then the program.
    Here,
    /// Firecracker's jailer, which is the program: it gets the root (a tmpfs of its own, where it may make
    /// its device nodes and copy Firecracker) and NoNewPrivs, and does the chroot, the uid and gid and the
    /// exec of Firecracker itself. Nothing of the host's system folders is bound (Firecracker is static).
    Jailer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    /// Where in the new root it appears: at its own path unless this says otherwise (a template's clone
    /// sees its own folder at the template's).
    pub at: Option<PathBuf>,
    pub writable: bool,
}

impl Bind {
    pub fn read_only(path: impl Into<PathBuf>) -> Bind {
        Bind { path: path.into(), at: None, writable: false }
    }
    pub fn writable(path: impl Into<PathBuf>) -> Bind {
        Bind { path: path.into(), at: None, writable: true }
    }
    /// This bind, seen at `at` in the new root.
    pub fn seen_at(self, at: impl Into<PathBuf>) -> Bind {
        Bind { at: Some(at.into()), ..self }
    }
    fn target(&self) -> &Path {
        self.at.as_deref().unwrap_or(&self.path)
    }
}

/// The host's program and library folders a dynamically linked VMM needs, read-only (a symlink such as
/// Debian's `/lib -> usr/lib` is made again as a symlink), the loader's cache, and the harmless device nodes.
pub fn system_binds() -> Vec<Bind> {
    let mut binds: Vec<Bind> = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache"]
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(|p| Bind::read_only(*p))
        .collect();
    // Device nodes are written to (/dev/null) but a file bind cannot be grown into anything else.
    binds.extend(["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"].map(Bind::writable));
    binds
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what} {path}: {source}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a path handed to the jail has a NUL byte: {0}")]
    Nul(String),
    #[error("a contained process never runs as root (uid or gid 0)")]
    Root,
    #[error("starting the contained process: {0}")]
    Clone(#[source] std::io::Error),
    #[error("the contained process could not {step}: {source}")]
    Child {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the contained process runs, and with which descriptors.
pub struct Program<'a> {
    pub binary: &'a Path,
    /// argv[1..].
    pub args: &'a [std::ffi::OsString],
    pub env: &'a [(&'a str, &'a str)],
    /// Where stdout and stderr go (stdin is /dev/null).
    pub output: &'a std::fs::File,
    /// Descriptors the program gets, each at the number given: (the daemon's fd, the number in the child).
    pub fds: &'a [(RawFd, RawFd)],
}

/// The steps the child reports a failure of, in order.
const STEPS: &[&str] = &[
    "start a session",
    "join its cgroup",
    "make its mounts private",
    "mount its root",
    "make a folder in its root",
    "make a file in its root",
    "make a symlink in its root",
    "bind a path into its root",
    "make a bound path read-only",
    "mount its /proc",
    "pivot into its root",
    "detach the old root",
    "make its root read-only",
    "set up its descriptors",
    "drop its capabilities",
    "set its groups",
    "take its gid",
    "take its uid",
    "set NoNewPrivs",
    "run the program",
    "install its seccomp filter",
];

enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink { target: CString, at: CString },
    Bind { src: CString, dst: CString, read_only: bool },
}

/// Everything the child needs, made before the clone.
struct Plan {
    finisher: Finisher,
    filters: Vec<seccompiler::BpfProgram>,
    root: CString,
    proc_dir: CString,
    ops: Vec<Op>,
    cgroups: Vec<OwnedFd>,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    binary: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    stdin: OwnedFd,
    output: RawFd,
    fds: Vec<(RawFd, RawFd)>,
}

fn cstr(bytes: &[u8]) -> Result<CString, JailError> {
    CString::new(bytes).map_err(|_| JailError::Nul(String::from_utf8_lossy(bytes).into_owned()))
}

fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Plan {
    fn new(jail: &Jail, program: &Program) -> Result<Plan, JailError> {
        let prepare = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Prepare { what, path, source }
        };
        let mut ops = vec![];
        let mut made: std::collections::BTreeSet<PathBuf> = Default::default();
        let mut bound: Vec<PathBuf> = vec![];
        let mut mkdirs = |path: &Path, ops: &mut Vec<Op>| -> Result<(), JailError> {
            let mut at = PathBuf::from("/");
            for part in path.components().skip(1) {
                at.push(part);
                if made.insert(at.clone()) {
                    ops.push(Op::Mkdir(cstr(under(&jail.root, &at).as_os_str().as_bytes())?));
                }
            }
            Ok(())
        };
        // The program itself, wherever it is installed, read-only (by its real path: it may be reached
        // through a symlinked folder such as /bin). The jailer runs before the new root is its root.
        let binary = std::fs::canonicalize(program.binary).map_err(prepare("looking for", program.binary))?;
        let mut binds = jail.binds.clone();
        if jail.finisher == Finisher::Here {
            binds.push(Bind::read_only(&binary));
        }
        // Folders before files, shorter paths first, so nothing is bound over what was bound already.
        binds.sort_by_key(|b| (b.target().components().count(), b.target().to_path_buf()));
        for bind in binds {
            let target = bind.target().to_path_buf();
            if bound.iter().any(|b| target.starts_with(b)) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&bind.path).map_err(prepare("looking at", &bind.path))?;
            let parent = target.parent().unwrap_or(Path::new("/"));
            mkdirs(parent, &mut ops)?;
            let dst = cstr(under(&jail.root, &target).as_os_str().as_bytes())?;
            if meta.file_type().is_symlink() && parent == Path::new("/") {
                // A top-level symlink (merged /usr): the same link, pointing into what is bound.
                let target = std::fs::read_link(&bind.path).map_err(prepare("reading", &bind.path))?;
                ops.push(Op::Symlink { target: cstr(target.as_os_str().as_bytes())?, at: dst });
                continue;
            }
            let is_dir = std::fs::metadata(&bind.path).map_err(prepare("looking at", &bind.path))?.is_dir();
            if is_dir {
                mkdirs(&target, &mut ops)?;
                bound.push(target.clone());
            } else {
                ops.push(Op::Touch(dst.clone()));
            }
            ops.push(Op::Bind { src: cstr(bind.path.as_os_str().as_bytes())?, dst, read_only: !bind.writable });
        }
        if jail.finisher == Finisher::Here {
            mkdirs(Path::new("/proc"), &mut ops)?;
        }
        let cgroups = jail
            .cgroups
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p).map(OwnedFd::from).map_err(prepare("opening", p)))
            .collect::<Result<Vec<_>, _>>()?;
        let stdin =
            std::fs::File::open("/dev/null").map(OwnedFd::from).map_err(prepare("opening", Path::new("/dev/null")))?;
        let name = program.binary.file_name().unwrap_or(OsStr::new("vmm"));
        let mut argv = vec![cstr(name.as_bytes())?];
        for a in program.args {
            argv.push(cstr(a.as_bytes())?);
        }
        let envp = program.env.iter().map(|(k, v)| cstr(format!("{k}={v}").as_bytes())).collect::<Result<_, _>>()?;
        let filters = match jail.syscall_filter {
            true => crate::syscall_filter::helper_filters().map_err(|e| JailError::Prepare {
                what: "compiling the seccomp filter for",
                path: program.binary.to_path_buf(),
                source: std::io::Error::other(e),
            })?,
            false => vec![],
        };
        Ok(Plan {
            finisher: jail.finisher,
            filters,
            root: cstr(jail.root.as_os_str().as_bytes())?,
            proc_dir: cstr(under(&jail.root, Path::new("/proc")).as_os_str().as_bytes())?,
            ops,
            cgroups,
            groups: jail.groups.clone(),
            uid: jail.uid,
            gid: jail.gid,
            binary: cstr(binary.as_os_str().as_bytes())?,
            argv,
            envp,
            stdin,
            output: program.output.as_raw_fd(),
            fds: program.fds.to_vec(),
        })
    }
}

/// Starts `program` contained by `jail` and returns its pid (in the daemon's PID namespace) once it runs the
/// program. The process is the daemon's child until the daemon exits; it is its own session leader, so it
/// outlives the daemon like every VMM.
pub fn spawn(jail: &Jail, program: &Program) -> Result<u32, JailError> {
    if jail.uid == 0 || jail.gid == 0 {
        return Err(JailError::Root);
    }
    let plan = Plan::new(jail, program)?;
    std::fs::create_dir_all(&jail.root).map_err(|source| JailError::Prepare {
        what: "creating",
        path: jail.root.clone(),
        source,
    })?;
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(JailError::Clone(std::io::Error::last_os_error()));
    }
    // SAFETY: both are fresh descriptors we own.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let argv: Vec<*const libc::c_char> =
        plan.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        plan.envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let flags = (libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a raw clone without CLONE_VM and without a new stack behaves like fork: the child gets a
    // copy-on-write copy of this thread only, and `child` makes nothing but system calls before execve or
    // _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(JailError::Clone(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; never returns.
        unsafe { child(&plan, write_end.as_raw_fd(), &argv, &envp) }
    }
    drop(write_end);
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::read(read_end.as_raw_fd(), report[got..].as_mut_ptr().cast(), report.len() - got) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got == 0 {
        return Ok(pid as u32);
    }
    // The child failed before running the program and has exited: reap it.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    let step = STEPS.get(u32::from_ne_bytes(report[..4].try_into().unwrap()) as usize).copied().unwrap_or("start");
    let errno = i32::from_ne_bytes(report[4..].try_into().unwrap());
    Err(JailError::Child { step, source: std::io::Error::from_raw_os_error(errno) })
}

/// The child's side: system calls only, then execve. On failure it writes (step, errno) to `report` and exits.
unsafe fn child(plan: &Plan, report: RawFd, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
    macro_rules! check {
        ($step:expr, $call:expr) => {{
            if $call < 0 {
                fail(report, $step);
            }
        }};
    }
    let null = std::ptr::null::<libc::c_char>();
    check!(0, libc::setsid());
    // The daemon's umask (077) would make the new root's folders untraversable for the VM's uid; what the
    // program itself creates gets 077 again below.
    libc::umask(0);
    for fd in &plan.cgroups {
        check!(1, libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1));
    }
    check!(2, libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()));
    // The jailer makes its device nodes in the root and copies Firecracker (a few MB) into it, then runs it
    // from there: that root may hold device nodes and programs, but no set-uid ones.
    let (root_flags, root_options) = match plan.finisher {
        Finisher::Here => (libc::MS_NOSUID | libc::MS_NODEV, c"mode=0755,size=1m"),
        Finisher::Jailer => (libc::MS_NOSUID, c"mode=0755,size=32m"),
    };
    check!(
        3,
        libc::mount(c"tmpfs".as_ptr(), plan.root.as_ptr(), c"tmpfs".as_ptr(), root_flags, root_options.as_ptr().cast())
    );
    for op in &plan.ops {
        match op {
            Op::Mkdir(path) => {
                if libc::mkdir(path.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                    fail(report, 4);
                }
            }
            Op::Touch(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                check!(5, fd);
                libc::close(fd);
            }
            Op::Symlink { target, at } => check!(6, libc::symlink(target.as_ptr(), at.as_ptr())),
            Op::Bind { src, dst, read_only } => {
                check!(
                    7,
                    libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND | libc::MS_REC, std::ptr::null())
                );
                if *read_only {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
                    check!(8, libc::mount(null, dst.as_ptr(), null, flags, std::ptr::null()));
                }
            }
        }
    }
    if plan.finisher == Finisher::Jailer {
        finish_for_the_jailer(plan, report, argv, envp)
    }
    check!(
        9,
        libc::mount(
            c"proc".as_ptr(),
            plan.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null()
        )
    );
    check!(10, libc::chdir(plan.root.as_ptr()));
    check!(10, libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()));
    check!(11, libc::umount2(c".".as_ptr(), libc::MNT_DETACH));
    check!(11, libc::chdir(c"/".as_ptr()));
    let ro_root = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    check!(12, libc::mount(null, c"/".as_ptr(), null, ro_root, std::ptr::null()));
    set_up_descriptors(plan, report);
    for cap in 0..64 {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && *libc::__errno_location() != libc::EINVAL {
            fail(report, 14);
        }
    }
    // Raw system calls, not glibc's wrappers: those broadcast the change to every thread the process had,
    // and this copy of one thread would wait forever for threads it does not have.
    check!(15, libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()));
    check!(16, libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid));
    check!(17, libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid));
    check!(18, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    for filter in &plan.filters {
        check!(20, crate::syscall_filter::install(filter));
    }
    libc::umask(0o077);
    libc::execve(plan.binary.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(report, 19)
}

/// Descriptors: every source first moved out of the way (a source may be another's target number); then
/// stdin, stdout and stderr; whatever else is open (the daemon opens everything close-on-exec, but be sure)
/// closes at execve.
unsafe fn set_up_descriptors(plan: &Plan, report: RawFd) {
    let mut moved = [0 as RawFd; 16];
    for (i, (src, _)) in plan.fds.iter().enumerate().take(moved.len()) {
        moved[i] = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
        if moved[i] < 0 {
            fail(report, 13);
        }
    }
    for (src, dst) in [(plan.stdin.as_raw_fd(), 0), (plan.output, 1), (plan.output, 2)] {
        if libc::dup2(src, dst) < 0 {
            fail(report, 13);
        }
    }
    for (i, (_, dst)) in plan.fds.iter().enumerate().take(moved.len()) {
        if libc::dup2(moved[i], *dst) < 0 {
            fail(report, 13);
        }
    }
    let first = 3 + plan.fds.iter().map(|(_, d)| *d).max().unwrap_or(2).max(2) as libc::c_uint;
    libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 4 /* CLOSE_RANGE_CLOEXEC */);
}

/// The rest of the child's work when Firecracker's jailer finishes the confinement: it needs its
/// capabilities to chroot, make device nodes and drop to the VM's uid, so only NoNewPrivs is set here (it
/// keeps anything the jailer or Firecracker runs from gaining privileges).
unsafe fn finish_for_the_jailer(
    plan: &Plan,
    report: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    set_up_descriptors(plan, report);
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
        fail(report, 18);
    }
    libc::umask(0o077);
    libc::execve(plan.binary.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(report, 19)
}

unsafe fn fail(report: RawFd, step: u32) -> ! {
    let errno = *libc::__errno_location();
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&step.to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    libc::write(report, msg.as_ptr().cast(), msg.len());
    libc::_exit(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a shell script contained by `jail` and returns how it ended and what it printed.
    fn run_sh(jail: &Jail, script: &str, out_path: &Path) -> (nix::sys::wait::WaitStatus, String) {
        let output = std::fs::File::create(out_path).unwrap();
        let args = ["-c".into(), script.into()];
        let program = Program {
            binary: Path::new("/bin/sh"),
            args: &args,
            env: &[("PATH", "/usr/bin:/bin")],
            output: &output,
            fds: &[],
        };
        let pid = spawn(jail, &program).unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
        (status, std::fs::read_to_string(out_path).unwrap())
    }

    fn root_only() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root");
        false
    }

    /// A contained shell sees only what was bound, as an unprivileged uid with no capabilities, NoNewPrivs,
    /// in PID and mount namespaces of its own; what it may not write it cannot.
    #[test]
    fn a_contained_process_sees_only_its_binds_and_holds_no_privilege() {
        if !root_only() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        let other = dir.path().join("other-vm");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("disk"), "secret").unwrap();
        std::fs::write(dir.path().join("image"), "image\n").unwrap();
        // Explicitly: another test of this process sets the daemon's umask (077) for a while.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("image"), std::fs::Permissions::from_mode(0o644)).unwrap();
        nix::unistd::chown(&vm, Some(nix::unistd::Uid::from_raw(1_900_000_123)), None).unwrap();
        let out_path = vm.join("out");
        let mut binds = system_binds();
        binds.push(Bind::writable(&vm));
        binds.push(Bind::read_only(dir.path().join("image")));
        let jail = Jail {
            uid: 1_900_000_123,
            gid: 1_900_000_123,
            groups: vec![1_900_000_000],
            root: dir.path().join("root"),
            binds,
            cgroups: vec![],
            finisher: Finisher::Here,
            syscall_filter: false,
        };
        let script = format!(
            "id -u; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status; echo pid $$; \
             cat {image}; test -e {other} && echo other-visible; {{ echo hi > {image}; }} 2>/dev/null || echo image-ro; \
             echo w > {vm}/w && echo vm-writable; {{ touch /etc/x; }} 2>/dev/null || echo root-ro; ls /proc | grep -c '^[0-9]'",
            image = dir.path().join("image").display(),
            other = other.join("disk").display(),
            vm = vm.display()
        );
        let (status, out) = run_sh(&jail, &script, &out_path);
        assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)), "{status:?}\n{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "1900000123", "{out}");
        assert_eq!(lines[1], "1900000123 1900000000", "{out}");
        assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
        assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");
        assert!(out.contains("pid 1\n"), "{out}");
        assert!(out.contains("image\n"), "{out}");
        assert!(!out.contains("other-visible"), "{out}");
        assert!(out.contains("image-ro") && out.contains("vm-writable") && out.contains("root-ro"), "{out}");
        // Only the shell and its children are in its PID namespace.
        assert!(lines.last().unwrap().parse::<u32>().unwrap() <= 3, "{out}");
        // Nothing was mounted on the host: the root folder is empty there.
        assert_eq!(std::fs::read_dir(dir.path().join("root")).unwrap().count(), 0);
    }

    /// A helper under banger's seccomp filter cannot take the first step of most kernel exploits and every
    /// jail escape (a user namespace, a mount, ptrace), while threads (clone3 refused as ENOSYS: the C
    /// library falls back to clone) and everything ordinary work.
    #[test]
    fn a_filtered_process_is_refused_namespaces_mounts_and_tracing_but_runs() {
        if !root_only() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out");
        let jail = Jail {
            uid: 1_900_000_125,
            gid: 1_900_000_125,
            groups: vec![],
            root: dir.path().join("root"),
            binds: system_binds(),
            cgroups: vec![],
            finisher: Finisher::Here,
            syscall_filter: true,
        };
        let script = "grep '^Seccomp:' /proc/self/status; \
            unshare -U true 2>/dev/null && echo userns-made || echo userns-refused; \
            unshare -U -m true 2>/dev/null && echo mountns-made || echo mountns-refused; \
            python3 -c 'import threading; t = threading.Thread(target=print, args=(\"thread-ran\",)); t.start(); t.join()'; \
            python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); l.syscall(0x40000000 | 39); print(\"x32-errno\", ctypes.get_errno())'; \
            ls / > /dev/null && echo ls-ran";
        let (_, out) = run_sh(&jail, script, &out_path);
        // x32's getpid: EPERM from the filter (an x32-less kernel says ENOSYS, 38, to an unfiltered caller).
        for want in ["Seccomp:\t2", "userns-refused", "mountns-refused", "thread-ran", "x32-errno 1", "ls-ran"] {
            assert!(out.lines().any(|l| l == want), "{want} missing from:\n{out}");
        }
        // And without the filter the same shell may make a user namespace: the refusal is the filter's.
        let (_, out) =
            run_sh(&Jail { syscall_filter: false, ..jail }, "unshare -U true && echo userns-made", &out_path);
        assert_eq!(out, "userns-made\n");
    }

    #[test]
    fn a_failing_step_is_reported_by_name() {
        if !root_only() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let output = tempfile::tempfile().unwrap();
        let jail = Jail {
            uid: 1_900_000_124,
            gid: 1_900_000_124,
            groups: vec![],
            root: dir.path().join("root"),
            binds: system_binds(),
            cgroups: vec![],
            finisher: Finisher::Here,
            syscall_filter: false,
        };
        let e = spawn(
            &jail,
            &Program { binary: &dir.path().join("missing"), args: &[], env: &[], output: &output, fds: &[] },
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let e = spawn(
            &Jail { uid: 0, ..jail },
            &Program { binary: Path::new("/bin/true"), args: &[], env: &[], output: &output, fds: &[] },
        )
        .unwrap_err();
        assert!(e.to_string().contains("root"), "{e}");
    }
}
