//! TAP devices. Netlink cannot create them (EOPNOTSUPP), so they are made persistent through the TUN
//! ioctls; everything else (bridge port, up/down, delete) goes through rtnetlink like the bridge.
//!
//! The kernel picks each name (`bgtap%d`, the lowest free number) in the same call that creates the device,
//! so two creates (in this daemon or not) can never pick one name: choosing a name by listing the existing
//! TAPs and then creating it was a race (issue 24). `IFF_TUN_EXCL` makes the call fail instead of attaching
//! should a device of that name exist anyway: TUNSETIFF on an existing persistent TAP attaches to it.
use std::os::fd::AsRawFd;

/// TUNSETIFF and TUNSETPERSIST from <linux/if_tun.h> (`_IOW('T', 202|203, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// TUNSETOWNER and TUNSETGROUP (`_IOW('T', 204|206, int)`).
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail with EBUSY rather than attach to an existing device of that name.
const IFF_TUN_EXCL: libc::c_short = 0x8000u16 as libc::c_short;

/// Creates a new persistent TAP named `<prefix><N>` (the kernel picks N) and returns its name; the VMM
/// attaches to it by name later.
pub fn create_persistent(prefix: &str) -> std::io::Result<String> {
    let template = format!("{prefix}%d");
    if template.len() >= libc::IFNAMSIZ || prefix.contains('%') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name prefix `{prefix}` is too long or has a `%`"),
        ));
    }
    create(&template)
}

/// Opens an existing TAP for a contained VMM, which gets the descriptor (`-netdev tap,fd=N`) and neither
/// `/dev/net/tun` nor the capability to open it. `IFF_VNET_HDR` as QEMU itself asks for it.
pub fn open(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    if name.contains('%') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}` is not a TAP name")));
    }
    let (tun, _) = set_iff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    Ok(tun.into())
}

/// Gives a persistent TAP to `uid` and `gid`: only processes running as them (or holding CAP_NET_ADMIN) may
/// attach to it. The kernel lets anyone who can open /dev/net/tun attach to a TAP that has neither, so every
/// TAP is made root's (`create_persistent`), handed to a VM's uid only for a VMM that opens it by name
/// (Firecracker, under its jailer), and made root's again when it goes back to the pool. Fails with EBUSY
/// while a process has it open.
pub fn set_owner(name: &str, uid: u32, gid: u32) -> std::io::Result<()> {
    if name.contains('%') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}` is not a TAP name")));
    }
    let (tun, _) = set_iff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    own(&tun, uid, gid)
}

fn own(tun: &std::fs::File, uid: u32, gid: u32) -> std::io::Result<()> {
    for (request, id) in [(TUNSETOWNER, uid), (TUNSETGROUP, gid)] {
        // SAFETY: TUNSETOWNER and TUNSETGROUP take the id by value.
        if unsafe { libc::ioctl(tun.as_raw_fd(), request, id as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// TUNSETIFF on a new /dev/net/tun descriptor: returns it and the name the kernel used.
fn set_iff(name: &str, flags: libc::c_short) -> std::io::Result<(std::fs::File, libc::ifreq)> {
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let req = set_iff_on(&tun, name, flags)?;
    Ok((tun, req))
}

fn set_iff_on(tun: &std::fs::File, name: &str, flags: libc::c_short) -> std::io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{name}` is too long for an interface name"),
        ));
    }
    // SAFETY: ifreq is plain data; we fill the name and flags, and the kernel reads exactly that.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: valid fd, valid pointer to an initialised ifreq for the duration of the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(req)
}

fn create(name: &str) -> std::io::Result<String> {
    let (tun, req) = set_iff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL)?;
    // The kernel wrote the name it chose back into the request (NUL-terminated).
    let chosen: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    let chosen = String::from_utf8(chosen)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "the kernel named the TAP in non-UTF-8"))?;
    // Owned before it is made persistent: if that fails, the TAP goes with the descriptor instead of staying
    // behind with no owner and a name nobody knows.
    own(&tun, 0, 0)?;
    // SAFETY: TUNSETPERSIST takes an int by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread in a network namespace of its own (threads it spawns share it), so the test's
    /// TAPs never appear on the host and vanish with the namespace.
    fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    }

    fn require_root() -> bool {
        let ok = nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/net/tun").exists();
        assert!(ok || std::env::var_os("BANGER_SKIP_ROOT_TESTS").is_some(), "this test needs root and /dev/net/tun");
        ok
    }

    #[test]
    fn concurrent_creates_get_distinct_new_taps() {
        if !require_root() {
            return;
        }
        let names = in_own_netns(|| {
            let threads: Vec<_> = (0..16).map(|_| std::thread::spawn(|| create_persistent("bgtap"))).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
        })
        .expect("unshare(CLONE_NEWNET)");
        let names: Vec<String> = names.into_iter().map(|r| r.expect("creating a TAP")).collect();
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), 16, "two creates got one TAP: {names:?}");
        assert!(names.iter().all(|n| n.starts_with("bgtap") && n[5..].parse::<u32>().is_ok()), "{names:?}");
    }

    /// A TAP is root's from the start: an unprivileged process cannot attach to it (the kernel would let it
    /// attach to one nobody owns) until it is handed to that process's uid.
    #[test]
    fn only_the_owner_attaches_to_a_tap() {
        if !require_root() {
            return;
        }
        let attach_as = |name: String, uid: u32| {
            std::thread::spawn(move || {
                // /dev/net/tun may be root's alone (0600 here), so it is opened first: the owner check is
                // TUNSETIFF's. Only this thread changes identity: raw syscalls, as glibc's would change every thread's.
                // SAFETY: plain system calls on this thread's credentials.
                let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
                }
                set_iff_on(&tun, &name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).map(|_| ()).map_err(|e| e.raw_os_error())
            })
            .join()
            .unwrap()
        };
        let (before, after, other) = in_own_netns(move || {
            let name = create_persistent("bgtap").expect("creating a TAP");
            let before = attach_as(name.clone(), 1_900_065_101);
            set_owner(&name, 1_900_065_101, 1_900_065_101).unwrap();
            let after = attach_as(name.clone(), 1_900_065_101);
            let other = attach_as(name, 1_900_065_102);
            (before, after, other)
        })
        .expect("unshare(CLONE_NEWNET)");
        assert_eq!(before, Err(Some(libc::EPERM)), "a root-owned TAP");
        assert_eq!(after, Ok(()), "its owner");
        assert_eq!(other, Err(Some(libc::EPERM)), "another uid");
    }

    #[test]
    fn an_existing_tap_is_never_attached_to() {
        if !require_root() {
            return;
        }
        let (first, again) = in_own_netns(|| {
            let first = create_persistent("bgtap").expect("creating a TAP");
            // The old code's call: the same name, explicitly. Without IFF_TUN_EXCL it would attach.
            (first.clone(), create(&first))
        })
        .expect("unshare(CLONE_NEWNET)");
        let err = again.expect_err("an explicit existing name must be refused");
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{first}: {err}");
    }
}
