//! Firecracker's jailer, run for real with the arguments `fc_jail::JailerSpec` builds, as far as a host without
//! hardware KVM allows: Firecracker runs chrooted as the contained uid, PID 1 of its own PID namespace, in the
//! cgroups with the limits asked for, and answers on its API socket inside the jail.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_vmm::cgroup::Limits;
use banger_vmm::fc_jail::JailerSpec;

const CACHE: &str = "/var/cache/banger";

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap().trim().to_string()
}

#[tokio::test]
async fn the_real_jailer_runs_firecracker_chrooted_unprivileged_and_limited() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let hint = "run scripts/setup-host.sh to install Firecracker and its jailer";
    let jailer = Path::new(CACHE).join("bin/jailer");
    let firecracker = Path::new(CACHE).join("bin/firecracker");
    assert!(jailer.is_file() && firecracker.is_file(), "{hint}");
    // This host's layout is cgroup v1 (the jailer's v1 mode); the VM's cgroup goes under this test's own
    // memory cgroup so nothing escapes the limits the test runs under.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let Some(memory_own) =
        own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.trim_start_matches('/').to_string()))
    else {
        eprintln!("skipped: the jailer test reads a cgroup v1 host");
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let id = format!("jailer-test-{}", std::process::id());
    let parent = PathBuf::from(&memory_own).join(format!("banger-jailer-test-{}", std::process::id()));
    let spec = JailerSpec {
        id: &id,
        firecracker: &firecracker,
        uid: 1_900_065_001,
        gid: 1_900_065_001,
        chroot_base: base.path(),
        cgroup_version: 1,
        parent_cgroup: parent.to_str().unwrap(),
        limits: Limits::for_shape(1, 256),
        netns: None,
    };
    // What the jailer will create in each hierarchy, so the test removes exactly that afterwards.
    let hierarchies: Vec<PathBuf> =
        ["memory", "cpu", "pids"].iter().map(|c| Path::new("/sys/fs/cgroup").join(c)).collect();
    let mut created: Vec<PathBuf> = vec![];
    for h in &hierarchies {
        let mut at = h.clone();
        for part in parent.join(&id).components() {
            at.push(part);
            if !at.exists() {
                created.push(at.clone());
            }
        }
    }
    // Firecracker inherits the jailer's output, so it goes to a file (a pipe would stay open for good).
    let log_path = base.path().join("jailer.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let status = std::process::Command::new(&jailer)
        .args(spec.args().unwrap())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    let said = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "jailer: {}", said());
    let pidfile = spec.root().join("firecracker.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(pidfile.exists() && spec.api_socket().exists()) {
        assert!(Instant::now() < deadline, "no jailed Firecracker: {}", said());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // Its API answers inside the jail (the guest itself cannot boot without hardware KVM).
    let dir = spec.api_socket().parent().unwrap().to_path_buf();
    let link = dir.join(banger_vmm::firecracker::API_SOCKET_NAME);
    let _ = std::os::unix::fs::symlink(spec.api_socket(), &link);
    let info = banger_vmm::firecracker::FcMachine::attach(pid, &dir).info().await;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(info.as_ref().unwrap()["id"], id.as_str(), "{info:?}");
        assert_eq!(status_field(pid, "Uid").split_whitespace().next(), Some("1900065001"));
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "NSpid").split_whitespace().last(), Some("1"), "its own PID namespace");
        // Its root is the jail: the copy of Firecracker is there, the host's /etc and /home are not.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        assert!(root.join("firecracker").is_file() && root.join("run/firecracker.socket").exists(), "chrooted");
        assert!(!root.join("etc").exists() && !root.join("home").exists(), "nothing of the host in its root");
        let memory = hierarchies[0].join(&parent).join(&id).join("memory.limit_in_bytes");
        assert_eq!(std::fs::read_to_string(memory).unwrap().trim(), ((256u64 + 256) << 20).to_string());
        let quota = hierarchies[1].join(&parent).join(&id).join("cpu.cfs_quota_us");
        assert_eq!(std::fs::read_to_string(quota).unwrap().trim(), "150000");
    }));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        let _ =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for dir in created.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
