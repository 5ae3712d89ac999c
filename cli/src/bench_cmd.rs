//! `banger bench`: numbers, printed, never asserted. Create-to-ready and a no-op exec round trip through the
//! daemon, next to the bare VMM booting the same kernel and image to the same point (the guest agent
//! answering), all measured in one run on this host.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;
use tools_schema::ops;
use tools_schema::vm::{VmCreateParams, VmExecParams, VmRefs};

use crate::{output, Ctx};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time VM creation and exec round trips against the bare VMM.
    #[command(after_help = "Example:\n  banger bench create --runs 5 --json")]
    Create(CreateBench),
}

#[derive(Args)]
pub struct CreateBench {
    /// VMs to create (and bare boots to time).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// No-op exec round trips per VM.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000))]
    execs: u32,
    /// Image to use (default image when omitted).
    #[arg(long)]
    image: Option<String>,
    /// Guest memory in MiB for every VM, bare boots included.
    #[arg(long, default_value_t = 256)]
    memory: u32,
}

#[derive(Serialize)]
pub struct Summary {
    pub n: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize)]
pub struct CreateReport {
    pub image: String,
    pub vmm: String,
    /// `vm.create` called until it returned a ready VM.
    pub create_to_ready: Summary,
    /// The same kernel, initramfs and image booted by the VMM alone until the guest agent answered.
    pub bare_vmm_boot_to_ready: Summary,
    /// create_to_ready p50 / bare p50.
    pub overhead_ratio_p50: f64,
    /// `vm.exec ["true"]` round trips.
    pub noop_exec: Summary,
}

fn summarize(mut ms: Vec<f64>) -> Summary {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = |p: f64| ms[(((p / 100.0) * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Summary { n: ms.len(), min_ms: ms[0], p50_ms: rank(50.0), p95_ms: rank(95.0), max_ms: ms[ms.len() - 1] }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(cmd: BenchCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let BenchCmd::Create(a) = cmd;
    let d = ctx.daemon().await?;
    let image = match &a.image {
        Some(i) => d.call::<ops::ImageShow>(&tools_schema::image::ImageRef { image: i.clone() }).await?,
        None => {
            let list = d.call::<ops::ImageList>(&Default::default()).await?;
            list.images
                .into_iter()
                .find(|i| i.is_default)
                .ok_or_else(|| anyhow::anyhow!("no default image; pass --image"))?
        }
    };
    let status = d.call::<ops::DaemonStatus>(&Default::default()).await?;
    let (mut creates, mut execs, mut bare) = (vec![], vec![], vec![]);
    for run in 0..a.runs {
        let name = format!("bench-{}-{run}", std::process::id());
        let started = Instant::now();
        let p = VmCreateParams {
            name: Some(name.clone()),
            image: Some(image.id.clone()),
            memory_mib: Some(a.memory),
            ..Default::default()
        };
        let created = d.call::<ops::VmCreate>(&p).await;
        let elapsed = started.elapsed();
        let result = async {
            created?;
            creates.push(ms(elapsed));
            for _ in 0..a.execs {
                let t = Instant::now();
                let r = d
                    .call::<ops::VmExec>(&VmExecParams {
                        vm: name.clone(),
                        command: vec!["true".into()],
                        env: Default::default(),
                        cwd: None,
                        stdin: None,
                        timeout_secs: None,
                        max_inline_bytes: None,
                    })
                    .await?;
                execs.push(ms(t.elapsed()));
                anyhow::ensure!(r.exit_code == Some(0), "`true` failed in the guest: {r:?}");
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        let _ = d.call::<ops::VmDelete>(&VmRefs { vms: vec![name.clone()] }).await;
        result?;
        bare.push(bare_boot(&image, a.memory).await?);
        if !ctx.json {
            eprintln!(
                "run {}/{}: create {:.0} ms, bare {:.0} ms",
                run + 1,
                a.runs,
                creates[creates.len() - 1],
                bare[bare.len() - 1]
            );
        }
    }
    let (create_to_ready, bare_vmm_boot_to_ready, noop_exec) = (summarize(creates), summarize(bare), summarize(execs));
    let report = CreateReport {
        image: image.name.clone(),
        vmm: status.vmm.vmm.as_str().to_string(),
        overhead_ratio_p50: create_to_ready.p50_ms / bare_vmm_boot_to_ready.p50_ms,
        create_to_ready,
        bare_vmm_boot_to_ready,
        noop_exec,
    };
    if ctx.json {
        output::json(&report);
    } else {
        let row = |name: &str, s: &Summary| {
            vec![
                name.to_string(),
                s.n.to_string(),
                format!("{:.1}", s.p50_ms),
                format!("{:.1}", s.p95_ms),
                format!("{:.1}", s.min_ms),
                format!("{:.1}", s.max_ms),
            ]
        };
        println!("image {} on {} ({})", report.image, report.vmm, status.vmm.qemu_accel);
        output::table(
            &["METRIC", "N", "P50 MS", "P95 MS", "MIN MS", "MAX MS"],
            &[
                row("create-to-ready (banger)", &report.create_to_ready),
                row("boot-to-ready (bare VMM)", &report.bare_vmm_boot_to_ready),
                row("no-op exec round trip", &report.noop_exec),
            ],
        );
        println!("banger create / bare boot (p50): {:.2}x", report.overhead_ratio_p50);
    }
    Ok(ExitCode::SUCCESS)
}

/// Boots the image with the VMM alone (no daemon, no network, no store): a throwaway copy-on-write disk,
/// the VMM, and the guest agent's first answer. Returns milliseconds from start to that answer.
async fn bare_boot(image: &tools_schema::image::ImageInfo, memory_mib: u32) -> anyhow::Result<f64> {
    use banger_server::vmm;
    let cfg = banger_server::Config::load(None)?;
    // The VMM detaches; as its subreaper this process can reap it by pid, as the daemon does.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let dir = tempfile_dir()?;
    let vm_id = format!("bench{}", std::process::id());
    let paths = vmm::VmPaths::new(dir.clone());
    let result = async {
        let started = Instant::now();
        vmm::create_overlay_disk(&cfg, std::path::Path::new(&image.rootfs), "raw", &paths.root_disk()).await?;
        let spec = vmm::BootSpec {
            vm_id: vm_id.clone(),
            hostname: "bench".into(),
            vcpus: 1,
            memory_mib,
            kernel: image.kernel.clone().into(),
            initrd: image.initrd.clone().map(Into::into),
            root_disk: paths.root_disk(),
            base_rootfs: image.rootfs.clone().into(),
            kernel_elf: image.kernel_elf.clone().map(Into::into),
            work_disk: None,
            vsock: cfg.qemu_channel == "vsock",
            dir: dir.clone(),
            net: None,
            extra_args: vec![],
            memory: vmm::GuestMemory::Anonymous,
            template_mac: None,
        };
        let accel = banger_server::host::choose_vmm(&cfg).qemu_accel;
        let launched = vmm::launch(tools_schema::daemon::VmmKind::Qemu, &cfg, &accel, &spec).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let ready = paths.guest_channel().ready(deadline, &Default::default()).await;
        let elapsed = started.elapsed();
        vmm::stop_vm_processes(&dir, &vm_id, Some(launched.pid)).await;
        ready?.0.close();
        Ok::<f64, anyhow::Error>(ms(elapsed))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("banger-bench-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}
