//! VM networking: one bridge with the host as gateway, a TAP per running VM (from a warm pool), addresses
//! from the bridge's subnet recorded in the store, opt-in NAT per VM, and `<name>.vm` DNS on the gateway.
//!
//! Guests reach each other and the host's DNS; nothing else on the host (nftables input rules), and other
//! networks only through NAT. Everything lives in the daemon's network namespace, so a test that runs the
//! daemon in a throwaway namespace gets all of it cleaned up with the namespace.
use parking_lot::Mutex;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::{LinkBridge, LinkUnspec};

pub mod dns;
pub mod nft;
pub use banger_vmm::tap;

/// Prefix of every TAP banger creates; anything else on the host is never touched.
pub const TAP_PREFIX: &str = "bgtap";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(#[source] rtnetlink::Error),
    /// A link netlink should have shown (a bridge, a TAP just made) is not there.
    #[error("netlink: {0}")]
    Missing(String),
    #[error("creating TAP {name}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Network),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn nl(e: rtnetlink::Error) -> NetError {
    NetError::Netlink(e)
}

pub use banger_vmm::net::GuestNet;

pub struct Network {
    pub bridge: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub dns: dns::DnsRecords,
    handle: rtnetlink::Handle,
    nft: PathBuf,
    idle_taps: Mutex<Vec<String>>,
    pool_size: usize,
    refilling: tokio::sync::Mutex<()>,
    _dns_task: tokio::task::JoinHandle<()>,
}

/// A VM that is running when the daemon starts: its TAP and NAT rule must survive set-up.
pub struct RunningVm {
    pub name: String,
    pub tap: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
    pub nat: bool,
}

impl Network {
    /// Brings the bridge, firewall table, TAP pool and DNS server to the state the running VMs need,
    /// removing leftovers (TAPs and rules) of VMs that are gone.
    pub async fn setup(
        bridge: &str,
        subnet: Ipv4Network,
        pool_size: usize,
        nft_bin: PathBuf,
        running: &[RunningVm],
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Network, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let gateway = subnet.nth(1).ok_or(NetError::Exhausted(subnet))?;
        let bridge_index = ensure_bridge(&handle, bridge, gateway, subnet.prefix()).await?;
        let nat: Vec<Ipv4Addr> = running.iter().filter(|v| v.nat).filter_map(|v| v.ip).collect();
        let guards = running_guards(running);
        nft::install(&nft_bin, bridge, subnet, &nat, &guards).await?;
        // ARP entries: the surviving VMs' pinned again, every other (a crashed daemon's, learned ones) gone.
        forget_neighbours(&handle, bridge, |_| true).await?;
        for g in &guards {
            pin_neighbour(&handle, bridge, g.ipv4, &g.mac).await?;
        }
        if !nat.is_empty() {
            enable_forwarding()?;
        }
        // Sort existing TAPs into in-use (kept), idle (pooled) and surplus (deleted).
        let in_use: HashSet<&str> = running.iter().filter_map(|v| v.tap.as_deref()).collect();
        let mut idle = vec![];
        for (name, index) in list_taps(&handle).await? {
            if in_use.contains(name.as_str()) {
                continue;
            }
            // A leftover may still be the uid's of a Firecracker VM that died with no daemon watching (or have
            // no owner at all, made by an older daemon): pooled only once it is root's again.
            if idle.len() < pool_size && tap::set_owner(&name, 0, 0).is_ok() {
                attach(&handle, index, bridge_index).await?;
                idle.push(name);
            } else {
                tracing::info!(tap = %name, "deleting a leftover TAP");
                handle.link().del(index).execute().await.map_err(nl)?;
            }
        }
        let records = dns::DnsRecords::new();
        for v in running {
            if let Some(ip) = v.ip {
                records.set(&v.name, ip);
            }
        }
        let dns_task = dns::serve(SocketAddr::new(IpAddr::V4(gateway), 53), records.clone(), shutdown).await?;
        let net = Network {
            bridge: bridge.to_string(),
            subnet,
            gateway,
            dns: records,
            handle,
            nft: nft_bin,
            idle_taps: Mutex::new(idle),
            pool_size,
            refilling: tokio::sync::Mutex::new(()),
            _dns_task: dns_task,
        };
        net.refill_pool().await;
        Ok(net)
    }

    /// The lowest free guest address.
    pub fn allocate_ip(&self, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, NetError> {
        self.subnet
            .iter()
            .skip(2) // network address and gateway
            .take_while(|ip| *ip != self.subnet.broadcast())
            .find(|ip| !used.contains(ip))
            .ok_or(NetError::Exhausted(self.subnet))
    }

    pub fn guest_net(&self, ip: Ipv4Addr, mac: &str) -> GuestNet {
        GuestNet { ip, prefix: self.subnet.prefix(), gateway: self.gateway, mac: mac.to_string() }
    }

    /// A TAP on the bridge, ready for a VMM: from the warm pool when it has one.
    pub async fn acquire_tap(&self) -> Result<String, NetError> {
        let pooled = self.idle_taps.lock().pop();
        let name = match pooled {
            Some(n) => n,
            None => self.create_tap().await?,
        };
        Ok(name)
    }

    /// Returns a TAP whose VMM has exited: back to the pool, or deleted when the pool is full.
    pub async fn release_tap(&self, name: &str) {
        // A Firecracker VM's TAP was its uid's (`tap::set_owner`): root's again before anyone else gets it,
        // and not kept at all if that fails (something still has it open).
        if let Err(e) = tap::set_owner(name, 0, 0) {
            tracing::warn!(tap = %name, error = %e, "cannot take the TAP back; deleting it");
            if let Err(e) = self.delete_tap(name).await {
                tracing::warn!(tap = %name, error = %e, "cannot delete TAP");
            }
            return;
        }
        let keep = {
            let mut idle = self.idle_taps.lock();
            if idle.len() < self.pool_size && !idle.iter().any(|n| n == name) {
                idle.push(name.to_string());
                true
            } else {
                false
            }
        };
        if !keep {
            if let Err(e) = self.delete_tap(name).await {
                tracing::warn!(tap = %name, error = %e, "cannot delete TAP");
            }
        }
    }

    /// Tops the warm pool up to its configured size.
    pub async fn refill_pool(&self) {
        // One refill at a time: two would each see the pool short and overfill it.
        let Ok(_refilling) = self.refilling.try_lock() else { return };
        while self.idle_taps.lock().len() < self.pool_size {
            match self.create_tap().await {
                Ok(n) => self.idle_taps.lock().push(n),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refill the TAP pool");
                    return;
                }
            }
        }
    }

    /// A new TAP on the bridge. The kernel picks its name in the call that creates it (`tap.rs`), so
    /// concurrent creates and pool refills never meet on one device.
    async fn create_tap(&self) -> Result<String, NetError> {
        let name = tap::create_persistent(TAP_PREFIX)
            .map_err(|source| NetError::Tap { name: format!("{TAP_PREFIX}%d"), source })?;
        let attached = async {
            let index =
                link_index(&self.handle, &name).await?.ok_or_else(|| NetError::Missing(format!("{name} vanished")))?;
            let bridge = link_index(&self.handle, &self.bridge)
                .await?
                .ok_or_else(|| NetError::Missing(format!("bridge {} vanished", self.bridge)))?;
            attach(&self.handle, index, bridge).await
        }
        .await;
        if let Err(e) = attached {
            let _ = self.delete_tap(&name).await;
            return Err(e);
        }
        Ok(name)
    }

    async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        if let Some(index) = link_index(&self.handle, name).await? {
            self.handle.link().del(index).execute().await.map_err(nl)?;
        }
        Ok(())
    }

    pub async fn enable_nat(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        enable_forwarding()?;
        Ok(nft::add_nat(&self.nft, ip).await?)
    }

    pub async fn disable_nat(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        Ok(nft::remove_nat(&self.nft, ip).await?)
    }

    /// Lets a VM's TAP carry that VM's traffic, and nothing else (its MAC, its addresses; beyond the
    /// subnet only with NAT). Every TAP carries nothing until this runs for it.
    /// The host's ARP entry for the VM's address is pinned to the VM's MAC at the same time (`pin_neighbour`).
    pub async fn guard_tap(&self, tap: &str, mac: &str, ip: Ipv4Addr, nat: bool) -> Result<(), NetError> {
        let guard = nft::TapGuard::new(tap, mac, ip, nat)?;
        nft::guard_tap(&self.nft, self.subnet, &guard).await?;
        pin_neighbour(&self.handle, &self.bridge, ip, &guard.mac).await
    }

    /// Takes a TAP's rules away when its VM lets it go: it carries nothing again, and the VM's address
    /// points nowhere until the next VM given it is guarded.
    pub async fn unguard_tap(&self, tap: &str, ip: Option<Ipv4Addr>) -> Result<(), NetError> {
        nft::unguard_tap(&self.nft, tap).await?;
        match ip {
            Some(ip) => forget_neighbours(&self.handle, &self.bridge, |n| n == ip).await,
            None => Ok(()),
        }
    }

    /// Idle TAPs in the pool (for status and tests).
    pub fn idle_taps(&self) -> Vec<String> {
        self.idle_taps.lock().clone()
    }
}

/// The TAP filters of the VMs that survived a daemon restart (one without a TAP, address or MAC has none,
/// so its TAP, if any, carries nothing).
fn running_guards(running: &[RunningVm]) -> Vec<nft::TapGuard> {
    running
        .iter()
        .filter_map(|v| match (&v.tap, &v.mac, v.ip) {
            (Some(tap), Some(mac), Some(ip)) => nft::TapGuard::new(tap, mac, ip, v.nat)
                .inspect_err(|e| tracing::warn!(vm = %v.name, error = %e, "its TAP carries nothing"))
                .ok(),
            _ => None,
        })
        .collect()
}

/// One IPv4 entry of the host's neighbour (ARP) table on the bridge.
struct Neighbour {
    ip: Ipv4Addr,
    message: rtnetlink::packet_route::neighbour::NeighbourMessage,
}

async fn bridge_neighbours(handle: &rtnetlink::Handle, bridge: &str) -> Result<Vec<Neighbour>, NetError> {
    use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
    let Some(index) = link_index(handle, bridge).await? else { return Ok(vec![]) };
    let mut out = vec![];
    let mut dump = handle.neighbours().get().set_address_family(rtnetlink::packet_route::AddressFamily::Inet).execute();
    while let Some(message) = dump.try_next().await.map_err(nl)? {
        if message.header.ifindex != index {
            continue;
        }
        let ip = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip {
            out.push(Neighbour { ip, message });
        }
    }
    Ok(out)
}

/// Pins the host's ARP entry for a VM's address to the VM's MAC. A learned entry keeps the MAC of whoever
/// answered last at that address (a deleted VM, a guest that borrowed it) until the kernel gives up on it,
/// which left the next VM given the address unreachable for half a minute; a pinned one is never taken
/// over by what a guest sends.
async fn pin_neighbour(handle: &rtnetlink::Handle, bridge: &str, ip: Ipv4Addr, mac: &[u8; 6]) -> Result<(), NetError> {
    let index =
        link_index(handle, bridge).await?.ok_or_else(|| NetError::Missing(format!("bridge {bridge} vanished")))?;
    handle.neighbours().add(index, IpAddr::V4(ip)).link_layer_address(mac).replace().execute().await.map_err(nl)
}

/// Deletes the bridge's ARP entries whose address `matches` (pinned or learned).
async fn forget_neighbours(
    handle: &rtnetlink::Handle,
    bridge: &str,
    matches: impl Fn(Ipv4Addr) -> bool,
) -> Result<(), NetError> {
    for n in bridge_neighbours(handle, bridge).await? {
        if !matches(n.ip) {
            continue;
        }
        match handle.neighbours().del(n.message).execute().await {
            Ok(()) => {}
            // Gone meanwhile (the kernel expired it): what we wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
            Err(e) => return Err(nl(e)),
        }
    }
    Ok(())
}

/// NAT needs IPv4 forwarding in the daemon's namespace.
fn enable_forwarding() -> Result<(), NetError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    Ok(())
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        // The kernel answers ENODEV for a name that does not exist.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(e)),
    }
}

async fn list_taps(handle: &rtnetlink::Handle) -> Result<Vec<(String, u32)>, NetError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = vec![];
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl)? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(name) = attr {
                if name.starts_with(TAP_PREFIX) {
                    out.push((name.clone(), msg.header.index));
                }
            }
        }
    }
    Ok(out)
}

async fn attach(handle: &rtnetlink::Handle, index: u32, bridge: u32) -> Result<(), NetError> {
    let msg = LinkUnspec::new_with_index(index).controller(bridge).up().build();
    handle.link().set(msg).execute().await.map_err(nl)
}

/// Creates the bridge if needed, gives it the gateway address, and brings it up. Returns its index.
async fn ensure_bridge(handle: &rtnetlink::Handle, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<u32, NetError> {
    let index = match link_index(handle, name).await? {
        Some(i) => i,
        None => {
            handle.link().add(LinkBridge::new(name).build()).execute().await.map_err(nl)?;
            link_index(handle, name)
                .await?
                .ok_or_else(|| NetError::Missing(format!("bridge {name} not found after creating it")))?
        }
    };
    let has_addr = {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut addrs = handle.address().get().set_link_index_filter(index).execute();
        let mut found = false;
        while let Some(a) = addrs.try_next().await.map_err(nl)? {
            if a.attributes.iter().any(|at| matches!(at, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == gateway)) {
                found = true;
            }
        }
        found
    };
    if !has_addr {
        handle.address().add(index, IpAddr::V4(gateway), prefix).execute().await.map_err(nl)?;
    }
    // A bridge whose MAC was never set takes its lowest port's, so it changes as TAPs come and go, and each
    // change makes the kernel flush the bridge's whole neighbour table, pinned entries included: the VMs'
    // pinned ARP entries would vanish with the next pool refill. A MAC set once stays.
    let fixed = LinkUnspec::new_with_index(index).address(bridge_mac(name).to_vec()).build();
    handle.link().set(fixed).execute().await.map_err(nl)?;
    let up = LinkUnspec::new_with_index(index).up().build();
    handle.link().set(up).execute().await.map_err(nl)?;
    Ok(index)
}

/// The bridge's own MAC: the same for a bridge name on every start, locally administered, unicast, and
/// outside the `02:` range guests get.
fn bridge_mac(name: &str) -> [u8; 6] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("banger bridge {name}").as_bytes());
    [0x0e, h[0], h[1], h[2], h[3], h[4]]
}
