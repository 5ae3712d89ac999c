//! A guest's network settings, as its kernel command line carries them.
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
    pub fn kernel_args(&self) -> Vec<String> {
        vec![
            format!("banger.ip={}/{}", self.ip, self.prefix),
            format!("banger.gw={}", self.gateway),
            format!("banger.dns={}", self.gateway),
            format!("banger.mac={}", self.mac),
        ]
    }
}
