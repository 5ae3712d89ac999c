//! Listening sockets from /proc/net, matched to their processes through /proc/*/fd socket inodes. Reading
//! the kernel's tables directly needs no `ss` in the image and sees every process, the agent's own included.
use std::collections::HashMap;

use tools_schema::guest::GuestListener;

pub fn listeners() -> Vec<GuestListener> {
    let owners = socket_owners();
    let mut out = vec![];
    for (file, proto, v6) in
        [("tcp", "tcp", false), ("tcp6", "tcp", true), ("udp", "udp", false), ("udp6", "udp", true)]
    {
        let table = std::fs::read_to_string(format!("/proc/net/{file}")).unwrap_or_default();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            // TCP: only LISTEN (0A). UDP has no listen state: a bound socket with no peer (07) is a server.
            let wanted = if proto == "tcp" { "0A" } else { "07" };
            if f[3] != wanted {
                continue;
            }
            let Some((addr, port)) = parse_endpoint(f[1], v6) else { continue };
            let inode: u64 = f[9].parse().unwrap_or(0);
            let owner = owners.get(&inode);
            out.push(GuestListener {
                proto: proto.to_string(),
                address: addr,
                port,
                pid: owner.map(|o| o.0),
                process: owner.map(|o| o.1.clone()),
                command: owner.map(|o| o.2.clone()),
            });
        }
    }
    out.sort_by(|a, b| (a.port, &a.proto, &a.address).cmp(&(b.port, &b.proto, &b.address)));
    out
}

/// `0100007F:1F90` (IPv4, little-endian words) or the 32-hex-digit IPv6 form.
fn parse_endpoint(s: &str, v6: bool) -> Option<(String, u16)> {
    let (hex_addr, hex_port) = s.split_once(':')?;
    let port = u16::from_str_radix(hex_port, 16).ok()?;
    let bytes: Vec<u8> =
        (0..hex_addr.len()).step_by(2).filter_map(|i| u8::from_str_radix(&hex_addr[i..i + 2], 16).ok()).collect();
    // The kernel prints each 32-bit word in host (little-endian) order.
    let fixed: Vec<u8> = bytes.chunks(4).flat_map(|w| w.iter().rev().copied().collect::<Vec<_>>()).collect();
    let addr = if v6 {
        let a: [u8; 16] = fixed.try_into().ok()?;
        std::net::Ipv6Addr::from(a).to_string()
    } else {
        let a: [u8; 4] = fixed.try_into().ok()?;
        std::net::Ipv4Addr::from(a).to_string()
    };
    Some((addr, port))
}

/// socket inode -> (pid, process name, command line).
fn socket_owners() -> HashMap<u64, (u32, String, String)> {
    let mut map = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return map };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let t = target.to_string_lossy();
            if let Some(inode) =
                t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|i| i.parse().ok())
            {
                map.entry(inode).or_insert_with(|| {
                    let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_string();
                    let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ").trim().to_string();
                    (pid, comm, cmd)
                });
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_socket_endpoints() {
        assert_eq!(parse_endpoint("0100007F:1F90", false), Some(("127.0.0.1".into(), 8080)));
        assert_eq!(parse_endpoint("00000000:0016", false), Some(("0.0.0.0".into(), 22)));
        assert_eq!(parse_endpoint("00000000000000000000000000000000:1F90", true), Some(("::".into(), 8080)));
        assert_eq!(parse_endpoint("00000000000000000000000001000000:0035", true), Some(("::1".into(), 53)));
    }
}
