//! What makes a guest its own VM: hostname, network settings, SSH keys, clock and RNG state.
//!
//! A cold boot takes them from the kernel command line (`init.rs`). A clone restored from a template
//! snapshot wakes up with the template's, so the host sends `Reidentify` and `reidentify` replaces every
//! one of them before the clone is handed out.
use std::path::Path;
use std::process::Command;

use tools_schema::guest::{CloneIdentity, GuestNetConfig};

/// Sets the kernel hostname and the files that name it.
pub fn set_hostname(name: &str) -> anyhow::Result<()> {
    nix::unistd::sethostname(name)?;
    std::fs::write("/etc/hostname", format!("{name}\n"))?;
    std::fs::write("/etc/hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{name}.vm {name}\n"))?;
    Ok(())
}

/// Applies static network settings with the interface ioctls: a handful of system calls and no netlink
/// client or async runtime, because a clone restored from a template runs every code path it has not run
/// yet through its emulator's (cold) translation cache, and on a warm start this runs on the critical path.
/// The NIC is the guest's one Ethernet interface; its MAC is set to the one given (a clone starts with its
/// template's), so no interface naming scheme is assumed.
pub fn configure_network(net: Option<&GuestNetConfig>) -> anyhow::Result<()> {
    let Some(net) = net else { return Ok(()) }; // no NIC for this VM
    let iface = find_nic().ok_or_else(|| anyhow::anyhow!("no Ethernet interface found"))?;
    let current = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap_or_default();
    let set_mac = !current.trim().eq_ignore_ascii_case(&net.mac);
    apply_network(&iface, set_mac, net)?;
    if set_mac {
        // The kernel derived the link-local address from the old MAC (a clone's is its template's, shared
        // by every clone, so all but one fail duplicate address detection): replace it with the new MAC's.
        if let Err(e) = replace_link_local(&iface, current.trim(), &net.mac) {
            eprintln!("banger-agent: IPv6 link-local address: {e}");
        }
    }
    if !net.dns.is_empty() {
        // `search vm` makes bare VM names resolve too.
        let _ = std::fs::remove_file("/etc/resolv.conf"); // may be a dangling symlink in some images
        std::fs::write(
            "/etc/resolv.conf",
            format!("nameserver {}\nsearch vm\noptions timeout:1 attempts:2\n", net.dns),
        )?;
    }
    Ok(())
}

/// The kernel's `struct rtentry` (<linux/route.h>), for SIOCADDRT/SIOCDELRT; glibc's libc crate lacks it.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads the family to interpret it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// MAC (if it differs), address and netmask, link up, default route. Setting the address replaces the one a
/// rehearsal left (see the warm pool); nothing else is removed (no flush, which costs time in a restored
/// TCG guest): the IPv6 link-local address is replaced on its own by `replace_link_local`.
fn apply_network(iface: &str, set_mac: bool, net: &GuestNetConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (address, prefix) = net.address.split_once('/').context("address must be ADDRESS/PREFIX")?;
    let address: std::net::Ipv4Addr = address.parse().context("bad address")?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32).context("bad prefix")?;
    let netmask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0));
    anyhow::ensure!(iface.len() < libc::IFNAMSIZ, "interface name {iface} is too long");
    // SAFETY: plain socket(2); the result is checked and owned.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let ioctl = |request: libc::c_ulong, arg: *mut libc::c_void, what: &str| -> anyhow::Result<()> {
        // SAFETY: every caller passes the struct its request expects, alive for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, arg) };
        anyhow::ensure!(rc == 0, "{what} on {iface}: {}", std::io::Error::last_os_error());
        Ok(())
    };
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, b) in name.iter_mut().zip(iface.bytes()) {
        *d = b as libc::c_char;
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let blank = || libc::ifreq { ifr_name: name, ifr_ifru: unsafe { std::mem::zeroed() } };
    if set_mac {
        let mac: Vec<u8> =
            net.mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().context("bad MAC")?;
        anyhow::ensure!(mac.len() == 6, "bad MAC {}", net.mac);
        let mut req = blank();
        // SAFETY: writing the union member SIOCSIFHWADDR reads.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, b) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(&mac) {
                *d = *b as libc::c_char;
            }
        }
        // virtio-net changes its MAC live (the driver tells the device), so the link need not go down.
        ioctl(libc::SIOCSIFHWADDR, &mut req as *mut _ as *mut _, "setting the MAC")?;
    }
    let mut req = blank();
    req.ifr_ifru.ifru_addr = sockaddr_v4(address);
    ioctl(libc::SIOCSIFADDR, &mut req as *mut _ as *mut _, "setting the address")?;
    let mut req = blank();
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    ioctl(libc::SIOCSIFNETMASK, &mut req as *mut _ as *mut _, "setting the netmask")?;
    let mut req = blank();
    ioctl(libc::SIOCGIFFLAGS, &mut req as *mut _ as *mut _, "reading the link flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut req as *mut _ as *mut _, "bringing the link up")?;
    if let Ok(gateway) = net.gateway.parse::<std::net::Ipv4Addr>() {
        let mut dev = name;
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_v4(gateway),
            rt_genmask: sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // Replaces a default route left from before (a clone keeps its template's routing table).
        let _ = ioctl(libc::SIOCDELRT, &mut route as *mut _ as *mut _, "removing the old default route");
        ioctl(libc::SIOCADDRT, &mut route as *mut _ as *mut _, "adding the default route")?;
    }
    Ok(())
}

/// The kernel's `struct in6_ifreq` (<linux/ipv6.h>), for SIOCSIFADDR/SIOCDIFADDR on an AF_INET6 socket.
#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().ok()?;
    bytes.try_into().ok()
}

/// The modified EUI-64 link-local address (RFC 4291) of a MAC: what the kernel makes by default.
fn eui64_link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8..16].copy_from_slice(&[mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]);
    std::net::Ipv6Addr::from(a)
}

/// Removes the link-local address the old MAC gave `iface` and adds the new MAC's (which then runs duplicate
/// address detection like any new address). Two ioctls: no `ip`, no netlink (see `apply_network`).
fn replace_link_local(iface: &str, old_mac: &str, new_mac: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let new = eui64_link_local(parse_mac(new_mac).context("bad MAC")?);
    let cname = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no interface {iface}");
    // SAFETY: plain socket(2); the result is checked and owned.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error()); // no IPv6 in this kernel
                                                                              // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let req = |addr: std::net::Ipv6Addr| In6Ifreq {
        addr: libc::in6_addr { s6_addr: addr.octets() },
        prefixlen: 64,
        ifindex: ifindex as libc::c_int,
    };
    if let Some(old) = parse_mac(old_mac).map(eui64_link_local).filter(|old| *old != new) {
        let mut r = req(old);
        // SAFETY: SIOCDIFADDR on an AF_INET6 socket reads an in6_ifreq, alive for the call. Absent is fine.
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCDIFADDR as _, &mut r as *mut In6Ifreq) };
    }
    let mut r = req(new);
    // SAFETY: as above, SIOCSIFADDR reads an in6_ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR as _, &mut r as *mut In6Ifreq) };
    let err = std::io::Error::last_os_error();
    anyhow::ensure!(rc == 0 || err.raw_os_error() == Some(libc::EEXIST), "adding {new}: {err}");
    Ok(())
}

/// The guest's Ethernet interface (virtio_net may still be probing early in boot).
fn find_nic() -> Option<String> {
    for _ in 0..100 {
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            let mut names: Vec<String> = entries
                .flatten()
                .filter(|e| {
                    // type 1 = ARPHRD_ETHER; a `device` link means real (here: virtio) hardware, not a bridge.
                    std::fs::read_to_string(e.path().join("type")).map(|t| t.trim() == "1").unwrap_or(false)
                        && e.path().join("device").exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            if let Some(n) = names.into_iter().next() {
                return Some(n);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// Authorises banger's key for root, makes this VM's own host key (images carry none; `fresh` replaces one
/// a template left behind), and starts sshd without waiting for it, so SSH never delays readiness.
pub fn start_sshd(authorized_key: Option<&str>, fresh: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !Path::new("/usr/sbin/sshd").exists() {
        return Ok(());
    }
    if let Some(key) = authorized_key {
        std::fs::create_dir_all("/root/.ssh")?;
        std::fs::set_permissions("/root/.ssh", std::fs::Permissions::from_mode(0o700))?;
        let path = "/root/.ssh/authorized_keys";
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        if !existing.lines().any(|l| l.trim() == key.trim()) {
            let sep = if existing.is_empty() || existing.ends_with('\n') { "" } else { "\n" };
            std::fs::write(path, format!("{existing}{sep}{}\n", key.trim()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let host_key = "/etc/ssh/ssh_host_ed25519_key";
    if fresh {
        let _ = std::fs::remove_file(host_key);
        let _ = std::fs::remove_file(format!("{host_key}.pub"));
    }
    if !Path::new(host_key).exists() {
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", host_key]).status()?;
        anyhow::ensure!(st.success(), "ssh-keygen failed");
    }
    std::fs::create_dir_all("/run/sshd")?;
    // sshd daemonises itself (its first process exits at once); PID 1 reaps the daemon if it ever exits.
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-o", &format!("HostKey={host_key}"), "-o", "PermitRootLogin=prohibit-password"])
        .spawn()?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// The public half of this VM's SSH host key (the one `start_sshd` makes), waiting up to `wait` for it to be
/// written: key generation runs beside readiness. A key file still being written is read again.
pub fn ssh_host_public_key(wait: std::time::Duration) -> Result<String, String> {
    let path = "/etc/ssh/ssh_host_ed25519_key.pub";
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            // ssh-keygen writes the line and its newline at once; without the newline it is not done yet.
            if let Some(line) = text.strip_suffix('\n').filter(|l| !l.contains('\n') && l.split(' ').count() >= 2) {
                return Ok(line.to_string());
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("no SSH host key at {path} yet"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Turns a freshly restored clone into its own VM. The clock and the RNG come first: everything after
/// (the SSH host key above all) must not be derived from the template's state.
pub fn reidentify(id: &CloneIdentity) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    set_clock(id.unix_time_ns)?;
    reseed_rng(&decode_hex(&id.entropy_hex)?)?;
    let t_rng = t.elapsed();
    set_hostname(&id.hostname)?;
    let t_host = t.elapsed();
    configure_network(id.net.as_ref())?;
    // On the console (the VM's boot log): where a slow warm start spent its time.
    eprintln!(
        "banger-agent: reidentified as {} in {:?} (clock+rng {:?}, hostname {:?}, network {:?})",
        id.hostname,
        t.elapsed(),
        t_rng,
        t_host - t_rng,
        t.elapsed() - t_host
    );
    if id.rehearsal {
        return Ok(());
    }
    // SSH follows without holding up the answer, as on a cold boot. The template never started sshd and
    // has no host key; this clone makes its own.
    let key = id.ssh_authorized_key.clone();
    std::thread::spawn(move || {
        if let Err(e) = start_sshd(key.as_deref(), true) {
            eprintln!("banger-agent: ssh: {e:#}");
        }
    });
    Ok(())
}

fn set_clock(unix_time_ns: u64) -> anyhow::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec for the duration of the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    anyhow::ensure!(rc == 0, "clock_settime: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Credits host entropy to the kernel's pool and forces the CRNG to reseed from it. Without the reseed
/// every clone of a template would draw the same random numbers: they all resume the same CRNG state.
fn reseed_rng(entropy: &[u8]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    anyhow::ensure!(entropy.len() >= 32 && entropy.len() <= 256, "entropy must be 32-256 bytes");
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 256],
    }
    // _IOW('R', 0x03, int[2]) and _IO('R', 0x07) from <linux/random.h>.
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; 256],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let random = std::fs::OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: the struct matches the kernel's rand_pool_info layout and outlives the calls.
    unsafe {
        anyhow::ensure!(
            libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &info) == 0,
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        );
        anyhow::ensure!(
            libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) == 0,
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn decode_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd-length hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| anyhow::anyhow!("bad hex: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn link_local_is_the_macs_modified_eui64() {
        let mac = parse_mac("52:54:00:b0:00:01").unwrap();
        assert_eq!(eui64_link_local(mac).to_string(), "fe80::5054:ff:feb0:1");
        assert!(parse_mac("52:54:00").is_none());
    }

    #[test]
    fn hex_decodes_and_rejects_junk() {
        assert_eq!(super::decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(super::decode_hex("0").is_err());
        assert!(super::decode_hex("zz").is_err());
    }
}
