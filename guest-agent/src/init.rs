//! PID 1 duties. Anything that fails here is printed to the console (the VM's boot log on the host).
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub fn run() -> anyhow::Result<()> {
    mount_pseudo_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(name) = kernel_arg(&cmdline, "banger.hostname") {
        if let Err(e) = nix::unistd::sethostname(name) {
            eprintln!("banger-agent: sethostname {name}: {e}");
        }
    }
    // The loopback interface is needed by almost every program; guest networking proper is configured by
    // the daemon through the agent.
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let self_exe = std::env::current_exe().unwrap_or_else(|_| "/usr/local/bin/banger-agent".into());
    let mut server = spawn_server(&self_exe);
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty())) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _))
                if Some(pid) == server =>
            {
                eprintln!("banger-agent: server exited; restarting it");
                std::thread::sleep(Duration::from_millis(500));
                server = spawn_server(&self_exe);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => {}
        }
    }
}

fn spawn_server(exe: &Path) -> Option<Pid> {
    match Command::new(exe)
        .arg("serve")
        .env_clear()
        .env("PATH", crate::exec::DEFAULT_PATH)
        .spawn()
    {
        Ok(child) => Some(Pid::from_raw(child.id() as i32)),
        Err(e) => {
            eprintln!("banger-agent: cannot start server: {e}");
            None
        }
    }
}

fn mount_pseudo_filesystems() {
    let mounts: &[(&str, &str, &str, &str)] = &[
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ];
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (src, target, fstype, data) in mounts {
        if mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target))
        {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        let flags = MsFlags::MS_NOSUID
            | if *fstype == "devtmpfs" || *fstype == "devpts" {
                MsFlags::empty()
            } else {
                MsFlags::MS_NODEV
            };
        if let Err(e) = mount(Some(*src), *target, Some(*fstype), flags, Some(*data)) {
            eprintln!("banger-agent: mount {target}: {e}");
        }
    }
}

/// Value of `key=value` on the kernel command line.
pub fn kernel_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
