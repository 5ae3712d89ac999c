//! TAP devices. Netlink cannot create them (EOPNOTSUPP), so they are made persistent through the TUN
//! ioctls; everything else (bridge port, up/down, delete) goes through rtnetlink like the bridge.
use std::os::fd::AsRawFd;

/// TUNSETIFF and TUNSETPERSIST from <linux/if_tun.h> (`_IOW('T', 202|203, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Creates a persistent TAP named `name` (the VMM attaches to it by name later).
pub fn create_persistent(name: &str) -> std::io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name `{name}` is too long"),
        ));
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; we fill the name and flags, and the kernel reads exactly that.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: valid fd, valid pointer to an initialised ifreq for the duration of the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an int by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
