//! Host firewall rules for the bridge, in two nftables tables owned by banger.
//!
//! `table inet banger` decides what guests may reach (the host only for DNS, other networks only with NAT).
//! `table bridge banger` makes every TAP carry only its own VM's traffic, like libvirt's clean-traffic
//! filter: frames entering the bridge from a TAP must have the VM's MAC, IPv4 its address, ARP must claim
//! only that MAC and address, IPv6 only its link-local address (and ND only for it); a TAP no running VM
//! holds (idle in the pool, a pooled or template VM before its identity) carries nothing. Without this a
//! guest could take another's address and be answered in its place (issue 15, finding 6).
//!
//! Both tables are rebuilt from scratch at daemon start (so rules of VMs that vanished while the daemon was
//! down cannot survive). Per VM, the inet table changes through a set of NAT sources, and the bridge table
//! through a verdict map keyed by TAP name whose element jumps to that VM's chain: a VM's rules are added and
//! removed as one element and one chain, never a table rebuild. Rules are applied as nft scripts
//! (`nft -f -`): each change is atomic, and the text is what an admin reads in `nft list ruleset`.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnetwork::Ipv4Network;
use tokio::io::AsyncWriteExt;

pub const TABLE: &str = "banger";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft is not installed (apt-get install nftables)")]
    Missing,
    #[error("nft rejected the rules: {0}")]
    Rejected(String),
    #[error("running nft")]
    Io(#[source] std::io::Error),
    #[error("cannot filter TAP `{tap}`: {reason}")]
    BadGuard { tap: String, reason: String },
}

async fn apply(nft: &Path, script: &str) -> Result<(), NftError> {
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { NftError::Missing } else { NftError::Io(e) })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(script.as_bytes()).await.map_err(NftError::Io)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(NftError::Io)?;
    if !out.status.success() {
        return Err(NftError::Rejected(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// What one VM's TAP may carry: frames from `mac`, IPv4 from `ipv4`, IPv6 from the link-local address
/// derived from `mac`, and (with `nat`) IPv4 to addresses outside the bridge's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapGuard {
    pub tap: String,
    pub mac: [u8; 6],
    pub ipv4: Ipv4Addr,
    pub nat: bool,
}

impl TapGuard {
    /// Checks what goes into the rules: the TAP is one of banger's by name, the MAC a unicast one.
    pub fn new(tap: &str, mac: &str, ipv4: Ipv4Addr, nat: bool) -> Result<TapGuard, NftError> {
        let bad = |reason: String| NftError::BadGuard { tap: tap.to_string(), reason };
        let ok_name = tap.len() < 16
            && tap
                .strip_prefix(super::TAP_PREFIX)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok_name {
            return Err(bad("not a banger TAP name".into()));
        }
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| if b.len() == 2 { u8::from_str_radix(b, 16).ok() } else { None })
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("bad MAC `{mac}`")))?;
        let mac: [u8; 6] = bytes.try_into().map_err(|_| bad(format!("bad MAC `{mac}`")))?;
        if mac[0] & 1 == 1 || mac == [0; 6] {
            return Err(bad("the MAC must be a unicast address".into()));
        }
        Ok(TapGuard { tap: tap.to_string(), mac, ipv4, nat })
    }

    /// The IPv6 link-local address the kernel derives from the MAC (modified EUI-64, RFC 4291).
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.mac;
        Ipv6Addr::from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]])
    }

    fn mac_text(&self) -> String {
        self.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    fn chain(&self) -> String {
        chain_of(&self.tap)
    }

    /// The VM's chain, as `add rule` lines (the caller creates and flushes the chain first).
    fn rules(&self, subnet: Ipv4Network) -> String {
        let (chain, mac, ip, ll) = (self.chain(), self.mac_text(), self.ipv4, self.link_local());
        // ICMPv6 ND target address: 128 bits after the 32-bit type/code/checksum and 32 reserved bits.
        let ll_hex = format!("0x{:032x}", u128::from(ll));
        let mut rules = vec![
            format!(r#"ether saddr != {mac} counter drop comment "spoofed source MAC""#),
            format!(
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation {{ request, reply }} \
                 arp saddr ether {mac} arp saddr ip {ip} accept"
            ),
            r#"ether type arp counter drop comment "ARP claiming another MAC or address""#.to_string(),
            format!(r#"ether type ip ip saddr != {ip} counter drop comment "spoofed source address""#),
        ];
        if !self.nat {
            rules.push(format!(r#"ether type ip ip daddr != {subnet} counter drop comment "no NAT for this VM""#));
        }
        rules.extend([
            "ether type ip accept".to_string(),
            r#"icmpv6 type { nd-router-advert, nd-redirect } counter drop comment "guests are not routers""#
                .to_string(),
            // Duplicate address detection and MLD come from the unspecified address, and only for its own.
            format!("ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 {ll_hex} accept"),
            "ip6 saddr :: icmpv6 type mld2-listener-report accept".to_string(),
            format!(r#"ether type ip6 ip6 saddr != {ll} counter drop comment "spoofed source address""#),
            format!(
                r#"icmpv6 type nd-neighbor-advert @th,64,128 != {ll_hex} counter drop comment "ND for another address""#
            ),
            "ether type ip6 accept".to_string(),
            r#"counter drop comment "other protocols""#.to_string(),
        ]);
        rules.into_iter().map(|r| format!("add rule bridge {TABLE} {chain} {r}\n")).collect()
    }

    /// Adds (or replaces) this VM's chain and points its TAP at it, in one transaction.
    fn add_script(&self, subnet: Ipv4Network) -> String {
        let chain = self.chain();
        format!(
            "add chain bridge {TABLE} {chain}\nflush chain bridge {TABLE} {chain}\n{}\
             add element bridge {TABLE} guests {{ \"{}\" : jump {chain} }}\n",
            self.rules(subnet),
            self.tap
        )
    }
}

fn chain_of(tap: &str) -> String {
    format!("tap_{tap}")
}

/// Replaces banger's tables: guests on `bridge` may reach the host only for DNS, may reach each other, and
/// reach other networks only when their address is in `nat_sources` (masqueraded); each TAP in `guards`
/// carries only its VM's traffic, and every other banger TAP nothing.
pub async fn install(
    nft: &Path,
    bridge: &str,
    subnet: Ipv4Network,
    nat_sources: &[Ipv4Addr],
    guards: &[TapGuard],
) -> Result<(), NftError> {
    let elements = if nat_sources.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", nat_sources.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "))
    };
    let prefix = super::TAP_PREFIX;
    // `add table` + `delete table` makes the delete succeed whether or not the table existed.
    let mut script = format!(
        r#"add table inet {TABLE}
delete table inet {TABLE}
add table bridge {TABLE}
delete table bridge {TABLE}
table inet {TABLE} {{
    set nat_sources {{
        type ipv4_addr
        {elements}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" udp dport 53 accept
        iifname "{bridge}" tcp dport 53 accept
        iifname "{bridge}" meta l4proto icmp accept
        iifname "{bridge}" drop comment "guests cannot reach host services, the daemon included"
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" oifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
        iifname "{bridge}" ip saddr @nat_sources accept
        iifname "{bridge}" drop comment "no way out without NAT"
        oifname "{bridge}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @nat_sources oifname != "{bridge}" masquerade
    }}
}}
table bridge {TABLE} {{
    map guests {{
        type ifname : verdict
    }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        iifname vmap @guests
        iifname "{prefix}*" counter drop comment "a TAP no running VM holds carries nothing"
    }}
}}
"#
    );
    for g in guards {
        script.push_str(&g.add_script(subnet));
    }
    apply(nft, &script).await
}

/// Lets `guard.tap` carry its VM's traffic (and only that), replacing whatever rules the TAP had.
pub async fn guard_tap(nft: &Path, subnet: Ipv4Network, guard: &TapGuard) -> Result<(), NftError> {
    apply(nft, &guard.add_script(subnet)).await
}

/// Takes a TAP's rules away: from now on it carries nothing. Idempotent.
pub async fn unguard_tap(nft: &Path, tap: &str) -> Result<(), NftError> {
    let chain = chain_of(tap);
    // Deleting what does not exist is an error in nft; add first so removal is idempotent.
    apply(
        nft,
        &format!(
            "add chain bridge {TABLE} {chain}\nadd element bridge {TABLE} guests {{ \"{tap}\" : jump {chain} }}\n\
             delete element bridge {TABLE} guests {{ \"{tap}\" }}\ndelete chain bridge {TABLE} {chain}\n"
        ),
    )
    .await
}

pub async fn add_nat(nft: &Path, ip: Ipv4Addr) -> Result<(), NftError> {
    apply(nft, &format!("add element inet {TABLE} nat_sources {{ {ip} }}\n")).await
}

pub async fn remove_nat(nft: &Path, ip: Ipv4Addr) -> Result<(), NftError> {
    // Deleting an absent element is an error in nft; add first so removal is idempotent.
    apply(
        nft,
        &format!(
            "add element inet {TABLE} nat_sources {{ {ip} }}\ndelete element inet {TABLE} nat_sources {{ {ip} }}\n"
        ),
    )
    .await
}

pub async fn uninstall(nft: &Path) -> Result<(), NftError> {
    apply(
        nft,
        &format!("add table inet {TABLE}\ndelete table inet {TABLE}\nadd table bridge {TABLE}\ndelete table bridge {TABLE}\n"),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_takes_only_banger_taps_and_unicast_macs() {
        let ip = Ipv4Addr::new(10, 254, 77, 3);
        assert!(TapGuard::new("bgtap3", "02:11:22:33:44:55", ip, false).is_ok());
        for (tap, mac) in [
            ("eth0", "02:11:22:33:44:55"),
            ("bgtap", "02:11:22:33:44:55"),
            ("bgtap1\" accept", "02:11:22:33:44:55"),
            ("bgtap1", "03:11:22:33:44:55"),
            ("bgtap1", "02:11:22:33:44"),
            ("bgtap1", "02:11:22:33:44:55:66"),
            ("bgtap1", "02:11:22:33:44:5"),
            ("bgtap1", "00:00:00:00:00:00"),
        ] {
            assert!(TapGuard::new(tap, mac, ip, false).is_err(), "{tap} {mac}");
        }
    }

    #[test]
    fn the_link_local_address_is_the_kernels_eui64() {
        let g = TapGuard::new("bgtap0", "52:54:00:b0:00:01", Ipv4Addr::new(10, 0, 0, 2), false).unwrap();
        assert_eq!(g.link_local(), "fe80::5054:ff:feb0:1".parse::<Ipv6Addr>().unwrap());
    }

    /// The scripts go through the real nft in a throwaway network namespace: the rules parse, a VM's chain
    /// comes and goes by element, and nothing else of the table moves. Needs root and nft (else skipped
    /// with a message: this is a unit test, the e2e attack tests in tests/ need both anyway).
    #[tokio::test]
    async fn rules_apply_and_a_vm_chain_comes_and_goes() {
        let Some(nft) = ["/usr/sbin/nft", "/sbin/nft"].into_iter().map(Path::new).find(|p| p.exists()) else {
            eprintln!("nft not installed; skipping");
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root; skipping");
            return;
        }
        let ns = format!("bgnft{}", std::process::id());
        assert!(std::process::Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
        let in_ns = format!("/tmp/{ns}-nft");
        std::fs::write(&in_ns, format!("#!/bin/sh\nexec ip netns exec {ns} {} \"$@\"\n", nft.display())).unwrap();
        std::fs::set_permissions(&in_ns, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let nft_ns = Path::new(&in_ns);
        let subnet: Ipv4Network = "10.254.77.0/24".parse().unwrap();
        let a = TapGuard::new("bgtap0", "02:00:00:00:00:0a", Ipv4Addr::new(10, 254, 77, 2), false).unwrap();
        let b = TapGuard::new("bgtap1", "02:00:00:00:00:0b", Ipv4Addr::new(10, 254, 77, 3), true).unwrap();
        let list = || {
            let out = std::process::Command::new(&in_ns).args(["list", "table", "bridge", TABLE]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let result = async {
            install(nft_ns, "banger0", subnet, &[], std::slice::from_ref(&a)).await?;
            assert!(list().contains("\"bgtap0\" : jump tap_bgtap0"), "{}", list());
            guard_tap(nft_ns, subnet, &b).await?;
            guard_tap(nft_ns, subnet, &b).await?; // replacing is fine
            let text = list();
            assert!(text.contains("chain tap_bgtap1") && text.contains("02:00:00:00:00:0b"), "{text}");
            assert_eq!(text.matches("no NAT for this VM").count(), 1, "only the non-NAT VM: {text}");
            unguard_tap(nft_ns, "bgtap1").await?;
            unguard_tap(nft_ns, "bgtap1").await?; // idempotent
            let text = list();
            assert!(!text.contains("bgtap1") && text.contains("tap_bgtap0"), "{text}");
            Ok::<(), NftError>(())
        }
        .await;
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = std::fs::remove_file(&in_ns);
        result.unwrap();
    }
}
