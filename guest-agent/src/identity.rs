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

/// Applies static network settings through netlink (no `ip` processes: a restored clone runs them slowly,
/// its emulator's translation cache being cold). The NIC is the guest's one Ethernet interface; its MAC is
/// set to the one given (a clone starts with its template's), so no interface naming scheme is assumed.
pub fn configure_network(net: Option<&GuestNetConfig>) -> anyhow::Result<()> {
    let Some(net) = net else { return Ok(()) }; // no NIC for this VM
    let iface = find_nic().ok_or_else(|| anyhow::anyhow!("no Ethernet interface found"))?;
    let current = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(apply_network(&iface, !current.trim().eq_ignore_ascii_case(&net.mac), net))?;
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

async fn apply_network(iface: &str, set_mac: bool, net: &GuestNetConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use futures::TryStreamExt;
    use rtnetlink::{LinkUnspec, RouteMessageBuilder};
    let (address, prefix) = net.address.split_once('/').context("address must be ADDRESS/PREFIX")?;
    let address: std::net::Ipv4Addr = address.parse().context("bad address")?;
    let prefix: u8 = prefix.parse().context("bad prefix")?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let link = handle
        .link()
        .get()
        .match_name(iface.to_string())
        .execute()
        .try_next()
        .await?
        .with_context(|| format!("no link {iface}"))?;
    let index = link.header.index;
    if set_mac {
        let mac: Vec<u8> =
            net.mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().context("bad MAC")?;
        // virtio-net changes its MAC live (the driver tells the device), so the link need not go down.
        handle.link().set(LinkUnspec::new_with_index(index).address(mac).build()).execute().await.context("set MAC")?;
    }
    let mut old = handle.address().get().set_link_index_filter(index).execute();
    while let Some(a) = old.try_next().await? {
        handle.address().del(a).execute().await.context("removing an old address")?;
    }
    handle.address().add(index, address.into(), prefix).execute().await.context("adding the address")?;
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.context("link up")?;
    if let Ok(gateway) = net.gateway.parse::<std::net::Ipv4Addr>() {
        let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new().gateway(gateway).output_interface(index).build();
        handle.route().add(route).replace().execute().await.context("default route")?;
    }
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

/// Turns a freshly restored clone into its own VM. The clock and the RNG come first: everything after
/// (the SSH host key above all) must not be derived from the template's state.
pub fn reidentify(id: &CloneIdentity) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    set_clock(id.unix_time_ns)?;
    reseed_rng(&decode_hex(&id.entropy_hex)?)?;
    let t_rng = t.elapsed();
    set_hostname(&id.hostname)?;
    configure_network(id.net.as_ref())?;
    // On the console (the VM's boot log): where a slow warm start spent its time.
    eprintln!("banger-agent: reidentified as {} (clock+rng {:?}, total {:?})", id.hostname, t_rng, t.elapsed());
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
    #[test]
    fn hex_decodes_and_rejects_junk() {
        assert_eq!(super::decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(super::decode_hex("0").is_err());
        assert!(super::decode_hex("zz").is_err());
    }
}
