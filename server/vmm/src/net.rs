//! A guest's network settings, as its kernel command line carries them (`BootArgs::net`).
use std::net::Ipv4Addr;

/// Network settings of one VM, as the guest gets them on its kernel command line.
#[derive(Debug, Clone)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
}

impl GuestNet {
    /// The settings as the agent reads them; the bridge's gateway is also the guest's DNS server.
    pub fn boot_net(&self) -> tools_schema::boot::BootNet {
        tools_schema::boot::BootNet {
            address: self.ip,
            prefix: self.prefix,
            gateway: self.gateway,
            dns: self.gateway,
            mac: self.mac.clone(),
        }
    }
}
