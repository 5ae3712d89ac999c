//! Arguments several commands share (`vm create` and `vm run`, the shape of `vm create`/`vm set`/`image warm`,
//! `--env`), kept apart so that no command module imports another for them.
use clap::Args;
use tools_schema::daemon::VmmKind;
use tools_schema::vm::{self, VmCreateParams};

#[derive(Args)]
pub struct CreateArgs {
    /// VM name (also its DNS name <name>.vm). Generated when omitted.
    #[arg(long)]
    pub name: Option<String>,
    /// Image name or id (default image when omitted).
    #[arg(long)]
    image: Option<String>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Force a VMM: firecracker or qemu.
    #[arg(long)]
    vmm: Option<VmmKind>,
    /// Let the VM reach other networks through NAT (by default it reaches only other VMs and DNS).
    #[arg(long)]
    nat: bool,
    /// auto: from the warm pool, else the image's warm-start template, else a cold boot; template: never
    /// the pool; cold: boot the kernel from scratch.
    #[arg(long, value_name = "auto|template|cold")]
    boot: Option<tools_schema::vm::BootRequest>,
}

impl CreateArgs {
    pub fn params(self) -> VmCreateParams {
        VmCreateParams {
            name: self.name,
            image: self.image,
            vcpus: self.shape.vcpus,
            memory_mib: self.shape.memory_mib,
            vmm: self.vmm,
            nat: Some(self.nat),
            boot: self.boot,
        }
    }
}

/// A VM's shape, as `vm create`, `vm set` and `image warm` take it.
#[derive(Args)]
pub struct ShapeArgs {
    /// Virtual CPUs (1-32).
    #[arg(long, value_parser = clap::value_parser!(u32).range(vm::MIN_VCPUS as i64..=vm::MAX_VCPUS as i64))]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB (128-65536), or a size such as 2G or 512M.
    #[arg(long = "memory", value_parser = parse_memory_mib)]
    pub memory_mib: Option<u32>,
}

/// `--memory`: MiB (`2048`) or a size (`2G`, `512M`), within the guest memory range.
pub(crate) fn parse_memory_mib(s: &str) -> Result<u32, String> {
    let range = vm::MIN_MEMORY_MIB..=vm::MAX_MEMORY_MIB;
    vm::parse_size(s, 1).and_then(|m| u32::try_from(m).ok()).filter(|m| range.contains(m)).ok_or_else(|| {
        format!("give {}-{} MiB, as MiB (2048) or a size (2G, 512M); `{s}` is not", range.start(), range.end())
    })
}

/// `KEY=VALUE`, as `--env` takes it.
pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_as_mib_or_a_size_within_the_range() {
        assert_eq!(parse_memory_mib("2048"), Ok(2048));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("1.5GiB"), Ok(1536));
        for bad in ["64", "lots", "2P", "0.3M", "128T"] {
            let e = parse_memory_mib(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && e.contains("128-65536"), "{bad}: {e}");
        }
    }
}
