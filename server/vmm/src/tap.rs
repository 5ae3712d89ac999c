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

/// TUNSETIFF on a new /dev/net/tun descriptor: returns it and the name the kernel used.
fn set_iff(name: &str, flags: libc::c_short) -> std::io::Result<(std::fs::File, libc::ifreq)> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{name}` is too long for an interface name"),
        ));
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
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
    Ok((tun, req))
}

fn create(name: &str) -> std::io::Result<String> {
    let (tun, req) = set_iff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL)?;
    // The kernel wrote the name it chose back into the request (NUL-terminated).
    let chosen: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    let chosen = String::from_utf8(chosen)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "the kernel named the TAP in non-UTF-8"))?;
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
