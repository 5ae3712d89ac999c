//! Host firewall rules for the bridge, as one nftables table owned by banger.
//!
//! The table is rebuilt from scratch at daemon start (so rules of VMs that vanished while the daemon was
//! down cannot survive) and changed per VM through a set of NAT sources. Rules are applied as nft scripts
//! (`nft -f -`): each change is atomic, and the text is what an admin reads in `nft list table inet banger`.
use std::net::Ipv4Addr;
use std::path::Path;

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

/// Replaces banger's table: guests on `bridge` may reach the host only for DNS, may reach each other, and
/// reach other networks only when their address is in `nat_sources` (masqueraded).
pub async fn install(nft: &Path, bridge: &str, nat_sources: &[Ipv4Addr]) -> Result<(), NftError> {
    let elements = if nat_sources.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", nat_sources.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "))
    };
    // `add table` + `delete table` makes the delete succeed whether or not the table existed.
    let script = format!(
        r#"add table inet {TABLE}
delete table inet {TABLE}
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
"#
    );
    apply(nft, &script).await
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
    apply(nft, &format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")).await
}
