//! The `banger.*` kernel command-line arguments: what the daemon tells a guest's agent at boot, before any
//! channel exists. The daemon renders them (`BootArgs::render`), the agent parses them (`BootArgs::parse`):
//! one type on both sides, so the two cannot drift apart. Words without the `banger.` prefix belong to the
//! kernel and are ignored here.
use std::net::Ipv4Addr;

use crate::daemon::VmmKind;

const PREFIX: &str = "banger.";

/// Everything the agent learns from its kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// `banger.hostname`: the guest's hostname.
    pub hostname: Option<String>,
    /// `banger.channel`: how the agent talks to the host.
    pub channel: ChannelKind,
    /// `banger.vmm`: which VMM runs the guest (it decides how the guest powers off).
    pub vmm: Option<VmmKind>,
    /// `banger.overlay=1`: the root disk is the image's shared read-only base; the agent (as PID 1, booted
    /// without an initramfs) puts an overlayfs on it whose writes go to the disk labelled `banger-overlay`.
    pub overlay_root: bool,
    /// `banger.template=1`: a template guest, snapshotted once ready; network and SSH are each clone's own.
    pub template: bool,
    /// `banger.growfs=root,work`: filesystems to grow to their disk's size at boot.
    pub grow: Vec<GrowFs>,
    /// `banger.sshkey`: the public key that may log in as root (base64 on the command line).
    pub ssh_key: Option<String>,
    /// `banger.ip`, `banger.gw`, `banger.dns`, `banger.mac`: static network settings.
    pub net: Option<BootNet>,
}

/// The guest channel's transport (also the config's `qemu_channel`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelKind {
    /// The virtio-serial port `org.banger.agent.0` (QEMU's default).
    #[default]
    VirtioSerial,
    /// vsock (Firecracker, or QEMU with vhost-user-vsock).
    Vsock,
}

/// A filesystem the agent grows at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowFs {
    Root,
    Work,
}

impl GrowFs {
    fn as_str(self) -> &'static str {
        match self {
            GrowFs::Root => "root",
            GrowFs::Work => "work",
        }
    }
}

/// Static IPv4 settings of the guest's NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// `aa:bb:cc:dd:ee:ff`, lower case.
    pub mac: String,
}

/// A `banger.*` argument the agent cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootArgsError {
    #[error("unknown boot argument `{0}`")]
    Unknown(String),
    #[error("boot argument `{key}` has a bad value `{value}`: {why}")]
    Bad { key: String, value: String, why: &'static str },
    #[error("boot arguments name a network only in part: `banger.ip` and `banger.mac` go together")]
    PartialNet,
}

impl BootArgs {
    /// The arguments as kernel command-line words, in a fixed order.
    pub fn render(&self) -> Vec<String> {
        use base64::Engine as _;
        let mut out = vec![];
        if let Some(h) = &self.hostname {
            out.push(format!("{PREFIX}hostname={h}"));
        }
        if let Some(n) = &self.net {
            out.push(format!("{PREFIX}ip={}/{}", n.address, n.prefix));
            out.push(format!("{PREFIX}gw={}", n.gateway));
            out.push(format!("{PREFIX}dns={}", n.dns));
            out.push(format!("{PREFIX}mac={}", n.mac));
        }
        if self.template {
            out.push(format!("{PREFIX}template=1"));
        }
        if !self.grow.is_empty() {
            let list: Vec<&str> = self.grow.iter().map(|g| g.as_str()).collect();
            out.push(format!("{PREFIX}growfs={}", list.join(",")));
        }
        if let Some(k) = &self.ssh_key {
            out.push(format!("{PREFIX}sshkey={}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(k)));
        }
        if self.channel == ChannelKind::Vsock {
            out.push(format!("{PREFIX}channel=vsock"));
        }
        if let Some(v) = self.vmm {
            out.push(format!("{PREFIX}vmm={}", v.as_str()));
        }
        if self.overlay_root {
            out.push(format!("{PREFIX}overlay=1"));
        }
        out
    }

    /// Reads the `banger.*` words of a kernel command line. A later word wins over an earlier one of the same
    /// key (as the kernel's own parameters do). A word that cannot be read is reported and skipped, and every
    /// other word still counts: one bad word must not cost the guest its channel, network and hostname.
    pub fn parse(cmdline: &str) -> (BootArgs, Vec<BootArgsError>) {
        use base64::Engine as _;
        let mut args = BootArgs::default();
        let mut errors = vec![];
        let (mut ip, mut gw, mut dns, mut mac) = (None, None, None, None);
        for word in cmdline.split_whitespace() {
            let mut read_word = || -> Result<(), BootArgsError> {
                let Some(rest) = word.strip_prefix(PREFIX) else { return Ok(()) };
                let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
                let bad =
                    |why: &'static str| BootArgsError::Bad { key: format!("{PREFIX}{key}"), value: value.into(), why };
                let flag = || match value {
                    "1" => Ok(true),
                    "0" => Ok(false),
                    _ => Err(bad("expected 0 or 1")),
                };
                match key {
                    "hostname" if is_hostname(value) => args.hostname = Some(value.to_string()),
                    "hostname" => return Err(bad("not a hostname (letters, digits, '-', '.', at most 63)")),
                    "channel" => {
                        args.channel = match value {
                            "vsock" => ChannelKind::Vsock,
                            "virtio-serial" => ChannelKind::VirtioSerial,
                            _ => return Err(bad("expected vsock or virtio-serial")),
                        }
                    }
                    "vmm" => {
                        args.vmm = Some(match value {
                            "firecracker" => VmmKind::Firecracker,
                            "qemu" => VmmKind::Qemu,
                            _ => return Err(bad("expected firecracker or qemu")),
                        })
                    }
                    "overlay" => args.overlay_root = flag()?,
                    "template" => args.template = flag()?,
                    "growfs" => {
                        args.grow = value
                            .split(',')
                            .filter(|g| !g.is_empty())
                            .map(|g| match g {
                                "root" => Ok(GrowFs::Root),
                                "work" => Ok(GrowFs::Work),
                                _ => Err(bad("expected a list of root and work")),
                            })
                            .collect::<Result<_, _>>()?
                    }
                    "sshkey" => {
                        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(value)
                            .map_err(|_| bad("not base64"))?;
                        args.ssh_key = Some(String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?);
                    }
                    "ip" => {
                        let (a, p) = value.split_once('/').ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
                        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| bad("prefix is 0..=32"))?;
                        ip = Some((a.parse::<Ipv4Addr>().map_err(|_| bad("not an IPv4 address"))?, prefix));
                    }
                    "gw" => gw = Some(value.parse::<Ipv4Addr>().map_err(|_| bad("not an IPv4 address"))?),
                    "dns" => dns = Some(value.parse::<Ipv4Addr>().map_err(|_| bad("not an IPv4 address"))?),
                    "mac" if is_mac(value) => mac = Some(value.to_ascii_lowercase()),
                    "mac" => return Err(bad("not a MAC address (aa:bb:cc:dd:ee:ff)")),
                    _ => return Err(BootArgsError::Unknown(word.to_string())),
                }
                Ok(())
            };
            if let Err(e) = read_word() {
                errors.push(e);
            }
        }
        args.net = match (ip, mac) {
            (Some((address, prefix)), Some(mac)) => Some(BootNet {
                address,
                prefix,
                gateway: gw.unwrap_or(Ipv4Addr::UNSPECIFIED),
                dns: dns.unwrap_or(Ipv4Addr::UNSPECIFIED),
                mac,
            }),
            (None, None) if gw.is_none() && dns.is_none() => None,
            _ => {
                errors.push(BootArgsError::PartialNet);
                None
            }
        };
        (args, errors)
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.starts_with('-')
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> BootArgs {
        BootArgs {
            hostname: Some("dev-1".into()),
            channel: ChannelKind::Vsock,
            vmm: Some(VmmKind::Firecracker),
            overlay_root: true,
            template: true,
            grow: vec![GrowFs::Root, GrowFs::Work],
            ssh_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA banger".into()),
            net: Some(BootNet {
                address: Ipv4Addr::new(10, 254, 77, 9),
                prefix: 24,
                gateway: Ipv4Addr::new(10, 254, 77, 1),
                dns: Ipv4Addr::new(10, 254, 77, 1),
                mac: "02:ab:cd:00:11:22".into(),
            }),
        }
    }

    #[test]
    fn what_the_daemon_renders_the_agent_parses_back() {
        for args in [full(), BootArgs::default(), BootArgs { hostname: Some("x".into()), ..Default::default() }] {
            let cmdline = format!(
                "console=ttyS0 quiet {} root=/dev/vda init=/usr/local/bin/banger-agent",
                args.render().join(" ")
            );
            assert_eq!(BootArgs::parse(&cmdline), (args, vec![]), "{cmdline}");
        }
    }

    #[test]
    fn the_rendered_words_are_the_documented_ones() {
        let words = full().render();
        for expected in [
            "banger.hostname=dev-1",
            "banger.ip=10.254.77.9/24",
            "banger.gw=10.254.77.1",
            "banger.dns=10.254.77.1",
            "banger.mac=02:ab:cd:00:11:22",
            "banger.template=1",
            "banger.growfs=root,work",
            "banger.channel=vsock",
            "banger.vmm=firecracker",
            "banger.overlay=1",
        ] {
            assert!(words.iter().any(|w| w == expected), "{expected} missing from {words:?}");
        }
        assert!(words.iter().all(|w| !w.contains(' ')), "a word with a space splits the command line: {words:?}");
    }

    #[test]
    fn bad_arguments_are_reported_by_name_and_the_rest_still_counts() {
        for (cmdline, key) in [
            ("banger.ip=10.0.0.300/24 banger.mac=02:00:00:00:00:01", "banger.ip"),
            ("banger.ip=10.0.0.3/33 banger.mac=02:00:00:00:00:01", "banger.ip"),
            ("banger.ip=10.0.0.3/24 banger.mac=02:00:00:00:00", "banger.mac"),
            ("banger.hostname=a;reboot", "banger.hostname"),
            ("banger.growfs=root,etc", "banger.growfs"),
            ("banger.channel=pigeon", "banger.channel"),
            ("banger.template=yes", "banger.template"),
            ("banger.sshkey=!!!", "banger.sshkey"),
            ("banger.frobnicate=1", "banger.frobnicate"),
        ] {
            let (_, errors) = BootArgs::parse(cmdline);
            assert!(errors.iter().any(|e| e.to_string().contains(key)), "{cmdline}: {errors:?}");
        }
        assert_eq!(BootArgs::parse("banger.ip=10.0.0.3/24").1, vec![BootArgsError::PartialNet]);
        // One unreadable word costs only itself: the channel, hostname and network still hold.
        let mut words = full().render();
        words.push("banger.frobnicate=1".into());
        let (args, errors) = BootArgs::parse(&words.join(" "));
        assert_eq!(args, full());
        assert_eq!(errors, vec![BootArgsError::Unknown("banger.frobnicate=1".into())]);
    }
}
