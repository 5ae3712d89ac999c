//! `banger bench`: numbers, printed, never asserted. In one run on this host: cold and warm create-to-ready
//! (and from the warm pool when it is on), the bare VMM booting the same kernel and image to the same point
//! (the guest agent answering), a no-op exec through the daemon next to the same exec and a raw echo straight
//! over a bare VM's channel, host memory per idle VM, and workspace prepare/export throughput next to the raw
//! channel's.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tools_schema::image::{ImageInfo, ImageWarmParams};
use tools_schema::ops;
use tools_schema::vm::{BootMode, BootRequest, VmCreateParams, VmExecParams, VmFileReadParams, VmInfo, VmRefs};
use tools_schema::workspace::{WorkspaceExportParams, WorkspacePrepareParams};

use crate::client::Daemon;
use crate::{output, Ctx};

#[derive(Args)]
#[command(after_help = "Example:\n  banger bench --runs 5 --json\n\nThe warm pool row appears when the daemon \
keeps one (it does unless its config says warm.pool_size = 0) and --memory is the daemon's default VM memory.")]
pub struct BenchArgs {
    /// Creates of each kind (cold, warm, pooled) and bare VMM boots to time.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// No-op exec and echo round trips.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000))]
    execs: u32,
    /// Image to use (default image when omitted).
    #[arg(long)]
    image: Option<String>,
    /// Guest memory in MiB for every VM, bare boots included.
    #[arg(long, default_value_t = 512, value_parser = crate::args::parse_memory_mib)]
    memory: u32,
    /// MiB of incompressible files moved by the throughput measurements.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    payload_mib: u32,
    /// Also measure under load: N creates at once (from the template), then N callers running --execs no-op
    /// execs each at once, and host memory per idle VM with N running.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=200))]
    load: Option<u32>,
}

#[derive(Serialize)]
pub struct Summary {
    pub n: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize)]
pub struct Memory {
    /// Resident set of the VMM process, MiB.
    pub rss_mib: f64,
    /// Proportional set: pages shared with other processes (a template's RAM file) counted by share, MiB.
    pub pss_mib: f64,
}

#[derive(Serialize)]
pub struct Throughput {
    pub payload_mib: u32,
    /// `workspace.prepare` of a repository holding the payload, MiB/s of payload.
    pub workspace_prepare_mib_s: f64,
    /// `workspace.export` of the payload written in the guest, including fetching the patch, MiB/s of payload.
    pub workspace_export_mib_s: f64,
    /// The payload written straight over a bare VM's channel into a guest tmpfs, MiB/s.
    pub raw_channel_write_mib_s: f64,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub image: String,
    pub vmm: String,
    pub acceleration: String,
    pub kernel: String,
    pub memory_mib: u32,
    /// `vm.create` with `cold: true`, until it returned a ready VM.
    pub cold_create_to_ready: Summary,
    /// `vm.create` restored from the image's template, until it returned a ready VM.
    pub warm_create_to_ready: Summary,
    /// `vm.create` served by the warm pool (absent when the daemon keeps none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_create_to_ready: Option<Summary>,
    /// The same kernel, initramfs (if any), image, disks and a NIC booted by the VMM alone (no daemon, no
    /// store, no bridge) until the guest agent answered.
    pub bare_vmm_boot_to_ready: Summary,
    /// p50 ratios.
    pub cold_over_bare: f64,
    pub warm_over_cold: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_over_cold: Option<f64>,
    /// `vm.exec ["true"]` through the daemon.
    pub noop_exec_via_daemon: Summary,
    /// The same exec straight over a bare VM's channel (no daemon).
    pub noop_exec_direct: Summary,
    /// An echo request straight over a bare VM's channel: the channel and the agent's request loop alone.
    pub raw_channel_echo: Summary,
    /// Host memory of one idle VM of each kind, a few seconds after it became ready.
    pub idle_cold_vm: Memory,
    pub idle_warm_vm: Memory,
    pub throughput: Throughput,
    /// The same operations at concurrency N (`--load N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

#[derive(Serialize)]
pub struct LoadReport {
    pub concurrency: u32,
    /// N `vm.create` (from the template) started at once: wall time, rate, each one's latency.
    pub creates_wall_ms: f64,
    pub creates_per_s: f64,
    pub create_to_ready: Summary,
    /// N callers, each running --execs no-op execs on its own VM, all at once.
    pub execs_per_s: f64,
    pub exec: Summary,
    /// Calls that failed (creates and execs); anything but 0 is a bug. The first errors say why.
    pub failures: u32,
    pub failure_examples: Vec<String>,
    /// With N idle VMs: their VMMs' mean RSS and PSS, and the drop in the host's MemAvailable per VM.
    pub idle_vm_at_n: Memory,
    pub host_memory_per_vm_mib: f64,
}

fn summarize(mut ms: Vec<f64>) -> Summary {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = |p: f64| ms[(((p / 100.0) * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Summary {
        n: ms.len(),
        min_ms: ms[0],
        p50_ms: rank(50.0),
        p95_ms: rank(95.0),
        p99_ms: rank(99.0),
        max_ms: ms[ms.len() - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn noop(vm: &str) -> VmExecParams {
    VmExecParams {
        vm: vm.to_string(),
        command: vec!["true".into()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        timeout_secs: None,
        max_inline_bytes: None,
    }
}

/// VMs the bench made, deleted however it ends.
struct Cleanup<'a> {
    d: &'a Daemon,
    names: Vec<String>,
}

impl Cleanup<'_> {
    async fn delete(&mut self, name: &str) {
        let _ = self.d.call::<ops::VmDelete>(&VmRefs { vm: name.to_string().into() }).await;
        self.names.retain(|n| n != name);
    }
    async fn all(&mut self) {
        if !self.names.is_empty() {
            let _ = self.d.call::<ops::VmDelete>(&VmRefs { vm: std::mem::take(&mut self.names).into() }).await;
        }
    }
}

pub async fn run(a: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    let mut cleanup = Cleanup { d: &d, names: vec![] };
    let result = bench(&a, ctx, &d, &mut cleanup).await;
    cleanup.all().await;
    let report = result?;
    if ctx.json {
        output::json(&report);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn progress(ctx: &Ctx, line: String) {
    if !ctx.json {
        eprintln!("{line}");
    }
}

async fn bench(a: &BenchArgs, ctx: &Ctx, d: &Daemon, cleanup: &mut Cleanup<'_>) -> anyhow::Result<BenchReport> {
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
    progress(ctx, format!("preparing the warm-start template of {} ({} MiB)...", image.name, a.memory));
    let warm =
        ImageWarmParams { image: Some(image.id.clone()), memory_mib: Some(a.memory), vcpus: Some(1), rebuild: None };
    d.call::<ops::ImageWarm>(&warm).await?;

    let tag = std::process::id();
    let create = |name: String, cold: bool| VmCreateParams {
        name: Some(name),
        image: Some(image.id.clone()),
        vcpus: Some(1),
        memory_mib: Some(a.memory),
        boot: Some(if cold { BootRequest::Cold } else { BootRequest::Template }),
        ..Default::default()
    };
    let (mut cold, mut warm_ms, mut bare) = (vec![], vec![], vec![]);
    for run in 0..a.runs {
        for (is_cold, into) in [(true, &mut cold), (false, &mut warm_ms)] {
            let name = format!("bench-{tag}-{}-{run}", if is_cold { "cold" } else { "warm" });
            cleanup.names.push(name.clone());
            let t = Instant::now();
            let vm = d.call::<ops::VmCreate>(&create(name.clone(), is_cold)).await?;
            into.push(ms(t.elapsed()));
            let want = if is_cold { BootMode::Cold } else { BootMode::Warm };
            check_mode(&vm, want)?;
            cleanup.delete(&name).await;
        }
        bare.push(bare_boot(&image, a.memory, None).await?.boot_ms);
        progress(
            ctx,
            format!(
                "run {}/{}: cold {:.0} ms, warm {:.0} ms, bare {:.0} ms",
                run + 1,
                a.runs,
                cold[cold.len() - 1],
                warm_ms[warm_ms.len() - 1],
                bare[bare.len() - 1]
            ),
        );
    }

    // The warm pool serves only the daemon's default image and shape.
    let mut pooled = vec![];
    let pool_serves = status.warm_pool.size > 0 && image.is_default && a.memory == status.warm_pool.memory_mib;
    if pool_serves {
        for run in 0..a.runs {
            wait_for_pool(d).await?;
            let name = format!("bench-{tag}-pool-{run}");
            cleanup.names.push(name.clone());
            let t = Instant::now();
            let vm =
                d.call::<ops::VmCreate>(&VmCreateParams { name: Some(name.clone()), ..Default::default() }).await?;
            pooled.push(ms(t.elapsed()));
            check_mode(&vm, BootMode::Pool)?;
            cleanup.delete(&name).await;
            progress(ctx, format!("pool run {}/{}: {:.0} ms", run + 1, a.runs, pooled[pooled.len() - 1]));
        }
    } else {
        progress(ctx, "warm pool: not measured (it is off, or serves another image or shape)".into());
    }

    // One idle VM of each kind: memory, exec round trips, workspace throughput.
    let (cold_name, warm_name) = (format!("bench-{tag}-idle-cold"), format!("bench-{tag}-idle-warm"));
    cleanup.names.extend([cold_name.clone(), warm_name.clone()]);
    let cold_vm = d.call::<ops::VmCreate>(&create(cold_name.clone(), true)).await?;
    let warm_vm = d.call::<ops::VmCreate>(&create(warm_name.clone(), false)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cold_vm = vm_memory(&cold_vm)?;
    let idle_warm_vm = vm_memory(&warm_vm)?;
    let mut execs = vec![];
    for _ in 0..a.execs {
        let t = Instant::now();
        let r = d.call::<ops::VmExec>(&noop(&warm_name)).await?;
        execs.push(ms(t.elapsed()));
        anyhow::ensure!(r.exit_code == Some(0), "`true` failed in the guest: {r:?}");
    }
    progress(ctx, format!("workspace prepare/export of {} MiB...", a.payload_mib));
    let (prepare, export) = workspace_throughput(d, &warm_name, a.payload_mib).await?;
    cleanup.all().await;

    progress(ctx, "bare VM: exec and echo straight over the channel...".into());
    let direct = bare_boot(&image, a.memory, Some((a.execs, a.payload_mib))).await?;
    let (noop_direct, echo, raw_write) = direct.channel.expect("measured");

    let load = match a.load {
        Some(n) => Some(load_phase(a, ctx, d, &image, n, cleanup).await?),
        None => None,
    };

    let kernel_mib = std::fs::metadata(&image.kernel).map(|m| m.len() >> 20).unwrap_or(0);
    let (cold_s, warm_s, bare_s) = (summarize(cold), summarize(warm_ms), summarize(bare));
    let pool_s = (!pooled.is_empty()).then(|| summarize(pooled));
    Ok(BenchReport {
        image: image.name.clone(),
        vmm: status.vmm.vmm.as_str().to_string(),
        acceleration: status.vmm.qemu_accel.as_str().to_string(),
        kernel: format!(
            "{kernel_mib} MiB kernel, {}",
            if image.initrd.is_some() { "with initramfs" } else { "no initramfs" }
        ),
        memory_mib: a.memory,
        cold_over_bare: cold_s.p50_ms / bare_s.p50_ms,
        warm_over_cold: warm_s.p50_ms / cold_s.p50_ms,
        pool_over_cold: pool_s.as_ref().map(|p| p.p50_ms / cold_s.p50_ms),
        cold_create_to_ready: cold_s,
        warm_create_to_ready: warm_s,
        pool_create_to_ready: pool_s,
        bare_vmm_boot_to_ready: bare_s,
        noop_exec_via_daemon: summarize(execs),
        noop_exec_direct: summarize(noop_direct),
        raw_channel_echo: summarize(echo),
        idle_cold_vm,
        idle_warm_vm,
        throughput: Throughput {
            payload_mib: a.payload_mib,
            workspace_prepare_mib_s: prepare,
            workspace_export_mib_s: export,
            raw_channel_write_mib_s: raw_write,
        },
        load,
    })
}

/// MemAvailable of this host, MiB.
fn mem_available_mib() -> f64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// `--load N`: N creates at once, then N exec loops at once, then memory with the N VMs idle. Failures are
/// counted, not fatal, so the report says how many there were.
async fn load_phase(
    a: &BenchArgs,
    ctx: &Ctx,
    d: &Daemon,
    image: &ImageInfo,
    n: u32,
    cleanup: &mut Cleanup<'_>,
) -> anyhow::Result<LoadReport> {
    use futures::future::join_all;
    let tag = std::process::id();
    let names: Vec<String> = (0..n).map(|i| format!("bench-{tag}-load-{i}")).collect();
    cleanup.names.extend(names.iter().cloned());
    let mut failures: Vec<String> = vec![];
    progress(ctx, format!("load: {n} creates at once..."));
    let available_before = mem_available_mib();
    let wall = Instant::now();
    let creates = join_all(names.iter().map(|name| async move {
        let t = Instant::now();
        let params = VmCreateParams {
            name: Some(name.clone()),
            image: Some(image.id.clone()),
            vcpus: Some(1),
            memory_mib: Some(a.memory),
            boot: Some(BootRequest::Template),
            ..Default::default()
        };
        d.call::<ops::VmCreate>(&params).await.map(|vm| (vm, ms(t.elapsed())))
    }))
    .await;
    let creates_wall = wall.elapsed();
    let mut up: Vec<VmInfo> = vec![];
    let mut create_ms = vec![];
    for r in creates {
        match r {
            Ok((vm, t)) => {
                create_ms.push(t);
                up.push(vm);
            }
            Err(e) => failures.push(format!("create: {e}")),
        }
    }
    anyhow::ensure!(!up.is_empty(), "no create succeeded under load: {failures:?}");
    progress(ctx, format!("load: {} callers x {} no-op execs at once...", up.len(), a.execs));
    let wall = Instant::now();
    let loops = join_all(up.iter().map(|vm| async move {
        let mut times = vec![];
        let mut errors = vec![];
        for _ in 0..a.execs {
            let t = Instant::now();
            match d.call::<ops::VmExec>(&noop(&vm.name)).await {
                Ok(r) if r.exit_code == Some(0) => times.push(ms(t.elapsed())),
                Ok(r) => errors.push(format!("exec in {}: `true` ended {:?}", vm.name, r.exit_code)),
                Err(e) => errors.push(format!("exec in {}: {e}", vm.name)),
            }
        }
        (times, errors)
    }))
    .await;
    let execs_wall = wall.elapsed();
    let mut exec_ms = vec![];
    for (times, errors) in loops {
        exec_ms.extend(times);
        failures.extend(errors);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut rss = 0.0;
    let mut pss = 0.0;
    for vm in &up {
        let m = vm_memory(vm)?;
        rss += m.rss_mib;
        pss += m.pss_mib;
    }
    let per_vm = (available_before - mem_available_mib()) / up.len() as f64;
    let count = up.len() as f64;
    let _ = d.call::<ops::VmDelete>(&VmRefs { vm: names.clone().into() }).await;
    cleanup.names.retain(|x| !names.contains(x));
    anyhow::ensure!(!exec_ms.is_empty(), "no exec succeeded under load: {failures:?}");
    Ok(LoadReport {
        concurrency: n,
        creates_wall_ms: ms(creates_wall),
        creates_per_s: create_ms.len() as f64 / creates_wall.as_secs_f64(),
        create_to_ready: summarize(create_ms),
        execs_per_s: exec_ms.len() as f64 / execs_wall.as_secs_f64(),
        exec: summarize(exec_ms),
        failures: failures.len() as u32,
        failure_examples: failures.into_iter().take(5).collect(),
        idle_vm_at_n: Memory { rss_mib: rss / count, pss_mib: pss / count },
        host_memory_per_vm_mib: per_vm,
    })
}

fn check_mode(vm: &VmInfo, want: BootMode) -> anyhow::Result<()> {
    let boot = vm.boot.as_ref().ok_or_else(|| anyhow::anyhow!("{} reports no boot information", vm.name))?;
    anyhow::ensure!(
        boot.mode == want,
        "{} came up {:?}, not {:?}{}: the numbers would be mislabelled",
        vm.name,
        boot.mode,
        want,
        boot.cold_reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    Ok(())
}

async fn wait_for_pool(d: &Daemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = d.call::<ops::DaemonStatus>(&Default::default()).await?;
        if s.warm_pool.ready > 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the warm pool did not refill within 2 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RSS and PSS of a VM's VMM process (this host's /proc).
fn vm_memory(vm: &VmInfo) -> anyhow::Result<Memory> {
    let pid = vm.pid.ok_or_else(|| anyhow::anyhow!("{} has no VMM pid", vm.name))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| anyhow::anyhow!("reading the VMM's memory (run the bench as the daemon's user): {e}"))?;
    let field = |name: &str| -> f64 {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok(Memory { rss_mib: field("Rss:"), pss_mib: field("Pss:") })
}

/// Prepares a repository of `payload_mib` random bytes into the VM, then exports as much new work from it.
async fn workspace_throughput(d: &Daemon, vm: &str, payload_mib: u32) -> anyhow::Result<(f64, f64)> {
    let repo = tempfile_dir("repo")?;
    let result = async {
        let bytes = payload_mib as u64 * 1024 * 1024;
        let mut chunk = vec![0u8; 1024 * 1024];
        for f in 0..4 {
            let mut data = Vec::with_capacity(bytes as usize / 4);
            while (data.len() as u64) < bytes / 4 {
                fill_random(&mut chunk);
                data.extend_from_slice(&chunk);
            }
            std::fs::write(repo.join(format!("blob{f}.bin")), &data[..(bytes / 4) as usize])?;
        }
        for args in [
            vec!["init", "-q", "-b", "main"],
            vec!["-c", "user.name=bench", "-c", "user.email=bench@banger", "add", "-A"],
            vec!["-c", "user.name=bench", "-c", "user.email=bench@banger", "commit", "-q", "-m", "payload"],
        ] {
            let st = std::process::Command::new("git").args(&args).current_dir(&repo).status()?;
            anyhow::ensure!(st.success(), "git {args:?} failed in the bench repository");
        }
        let t = Instant::now();
        d.call::<ops::WorkspacePrepare>(&WorkspacePrepareParams {
            vm: vm.to_string(),
            path: repo.display().to_string(),
            mode: None,
            force: true,
            git_user_name: Some("bench".into()),
            git_user_email: Some("bench@banger".into()),
        })
        .await?;
        let prepare = mib_s(bytes, t.elapsed());
        let gen = d
            .call::<ops::VmExec>(&VmExecParams {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("head -c {bytes} /dev/urandom > /root/repo/new-work.bin"),
                ],
                ..noop(vm)
            })
            .await?;
        anyhow::ensure!(gen.exit_code == Some(0), "writing the guest's work failed: {gen:?}");
        let t = Instant::now();
        let exported = d
            .call::<ops::WorkspaceExport>(&WorkspaceExportParams {
                vm: vm.to_string(),
                base: None,
                check_repo: None,
                max_inline_bytes: None,
                delete: false,
            })
            .await?;
        if !exported.patch_inline {
            let mut offset = 0;
            while offset < exported.patch_bytes {
                let r = d
                    .call::<ops::VmFileRead>(&VmFileReadParams {
                        vm: vm.to_string(),
                        path: exported.patch_path.clone(),
                        offset: Some(offset),
                        limit: Some(tools_schema::vm::MAX_FILE_CHUNK),
                        encoding: None,
                    })
                    .await?;
                anyhow::ensure!(r.bytes > 0, "the patch ended early");
                offset += r.bytes;
            }
        }
        Ok((prepare, mib_s(bytes, t.elapsed())))
    }
    .await;
    let _ = std::fs::remove_dir_all(&repo);
    result
}

fn fill_random(buf: &mut [u8]) {
    // xorshift: incompressible enough for git and the patch encoder, and no extra dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ Instant::now().elapsed().as_nanos() as u64 ^ buf.as_ptr() as u64;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        b.copy_from_slice(&bytes[..b.len()]);
    }
}

struct BareBoot {
    boot_ms: f64,
    /// No-op exec round trips, echo round trips, and the raw write throughput (MiB/s), when asked for.
    channel: Option<(Vec<f64>, Vec<f64>, f64)>,
}

/// Boots the image with the VMM alone (no daemon, no network, no store): a throwaway copy-on-write disk,
/// the VMM, and the guest agent's first answer. With `measure`, also times exec and echo round trips and a
/// raw write straight over the channel.
async fn bare_boot(image: &ImageInfo, memory_mib: u32, measure: Option<(u32, u32)>) -> anyhow::Result<BareBoot> {
    use banger_vmm as vmm;
    // The programs the host set-up installed; the acceleration the host has. The bare VMM runs QEMU over
    // virtio-serial, the daemon's default channel.
    let tools = vmm::Tools::host_default();
    // The VMM detaches; as its subreaper this process can reap it by pid, as the daemon does.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let dir = tempfile_dir("vm")?;
    let vm_id = format!("bench{}", std::process::id());
    let paths = vmm::VmPaths::new(dir.clone());
    let result = async {
        let started = Instant::now();
        // The same disks a VM gets: root and work (/root), copy-on-write over the image's files.
        vmm::create_overlay_disk(&tools, Path::new(&image.rootfs), "raw", &paths.root_disk()).await?;
        let work = (!image.work_seed.is_empty()).then(|| paths.work_disk());
        if let Some(w) = &work {
            vmm::create_overlay_disk(&tools, Path::new(&image.work_seed), "raw", w).await?;
        }
        let spec = vmm::BootSpec {
            vm_id: vm_id.clone(),
            hostname: "bench".into(),
            vcpus: 1,
            memory_mib,
            kernel: image.kernel.clone().into(),
            initrd: image.initrd.clone().map(Into::into),
            layout: vmm::RootLayout::Qcow2,
            drives: vmm::RootLayout::Qcow2.drives(&paths, Path::new(&image.rootfs), work.is_some()),
            kernel_elf: image.kernel_elf.clone().map(Into::into),
            vsock: false,
            dir: dir.clone(),
            // A NIC like a VM's, so the guest does the same work: QEMU makes the TAP (no bridge, no address on
            // the host side, gone with the process) and the guest configures a link-local address on it.
            net: Some((
                format!("bgbench{}", std::process::id() % 100_000),
                vmm::net::GuestNet {
                    ip: std::net::Ipv4Addr::new(169, 254, 77, 2),
                    prefix: 30,
                    gateway: std::net::Ipv4Addr::new(169, 254, 77, 1),
                    mac: "52:54:00:b0:be:01".into(),
                },
            )),
            args: Default::default(),
            memory: vmm::GuestMemory::Anonymous,
            template_mac: None,
            anchor: None,
            contain: None,
        };
        let driver = vmm::Driver::new(
            tools_schema::daemon::VmmKind::Qemu,
            &vmm::DriverSettings {
                tools: tools.clone(),
                qemu_accel: vmm::host::qemu_accel(vmm::host::acceleration()),
                qemu_vsock: spec.vsock,
                qemu_root_layout: vmm::RootLayout::Qcow2,
            },
        );
        let launched = driver.launch(&spec).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let ready = paths.guest_channel().ready(deadline, &Default::default()).await;
        let boot_ms = ms(started.elapsed());
        let measured = match (&ready, measure) {
            (Ok((conn, _)), Some((n, payload_mib))) => {
                // Let the fresh guest settle (sshd starting), as the daemon-side VM did before its execs.
                tokio::time::sleep(Duration::from_secs(5)).await;
                Some(measure_channel(conn, n, payload_mib).await)
            }
            _ => None,
        };
        vmm::stop_vm_processes(&dir, &vm_id, Some(launched.pid)).await;
        ready?.0.close();
        Ok::<BareBoot, anyhow::Error>(BareBoot { boot_ms, channel: measured.transpose()? })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure_channel(
    conn: &banger_vmm::guest::GuestConn,
    n: u32,
    payload_mib: u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let cancel = Default::default();
    let (mut execs, mut echoes) = (vec![], vec![]);
    for _ in 0..n {
        let spec = tools_schema::guest::ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            cwd: None,
            stdin: false,
            timeout_ms: None,
        };
        let t = Instant::now();
        let out = conn.exec(spec, None, 1024, &cancel).await?;
        execs.push(ms(t.elapsed()));
        anyhow::ensure!(out.status.code == Some(0), "`true` failed in the bare guest");
        let t = Instant::now();
        conn.echo("ping").await?;
        echoes.push(ms(t.elapsed()));
    }
    let mut data = vec![0u8; payload_mib as usize * 1024 * 1024];
    fill_random(&mut data);
    let t = Instant::now();
    conn.write_file("/dev/shm/banger-bench", None, false, &data, &banger_vmm::guest::CancellationToken::new()).await?;
    Ok((execs, echoes, mib_s(data.len() as u64, t.elapsed())))
}

fn print_report(r: &BenchReport) {
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
    println!("image {} ({}), {} with {}, {} MiB guests", r.image, r.kernel, r.vmm, r.acceleration, r.memory_mib);
    let mut rows = vec![
        row("create-to-ready, cold", &r.cold_create_to_ready),
        row("create-to-ready, warm (template)", &r.warm_create_to_ready),
    ];
    if let Some(p) = &r.pool_create_to_ready {
        rows.push(row("create-to-ready, warm pool", p));
    }
    rows.extend([
        row("boot-to-ready, bare VMM", &r.bare_vmm_boot_to_ready),
        row("no-op exec via daemon", &r.noop_exec_via_daemon),
        row("no-op exec, bare channel", &r.noop_exec_direct),
        row("echo, bare channel", &r.raw_channel_echo),
    ]);
    output::table(&["METRIC", "N", "P50 MS", "P95 MS", "MIN MS", "MAX MS"], &rows);
    println!();
    println!("cold / bare (p50):  {:.2}x", r.cold_over_bare);
    println!("warm / cold (p50):  {:.3}", r.warm_over_cold);
    if let Some(p) = r.pool_over_cold {
        println!("pool / cold (p50):  {p:.3}");
    }
    println!(
        "idle VM memory:     cold {:.0} MiB RSS ({:.0} PSS), warm {:.0} MiB RSS ({:.0} PSS)",
        r.idle_cold_vm.rss_mib, r.idle_cold_vm.pss_mib, r.idle_warm_vm.rss_mib, r.idle_warm_vm.pss_mib
    );
    let t = &r.throughput;
    println!(
        "throughput ({} MiB): workspace prepare {:.1} MiB/s, export {:.1} MiB/s, raw channel write {:.1} MiB/s",
        t.payload_mib, t.workspace_prepare_mib_s, t.workspace_export_mib_s, t.raw_channel_write_mib_s
    );
    if let Some(l) = &r.load {
        println!();
        println!("under load (concurrency {}):", l.concurrency);
        output::table(
            &["METRIC", "N", "P50 MS", "P99 MS", "MIN MS", "MAX MS"],
            &[("create-to-ready (template)", &l.create_to_ready), ("no-op exec via daemon", &l.exec)]
                .iter()
                .map(|(name, s)| {
                    vec![
                        name.to_string(),
                        s.n.to_string(),
                        format!("{:.1}", s.p50_ms),
                        format!("{:.1}", s.p99_ms),
                        format!("{:.1}", s.min_ms),
                        format!("{:.1}", s.max_ms),
                    ]
                })
                .collect::<Vec<_>>(),
        );
        println!(
            "creates/s {:.2} ({} at once in {:.0} ms), execs/s {:.1}, failures {}",
            l.creates_per_s, l.concurrency, l.creates_wall_ms, l.execs_per_s, l.failures
        );
        for f in &l.failure_examples {
            println!("  failure: {f}");
        }
        println!(
            "idle VM at {}: {:.0} MiB RSS ({:.0} PSS) per VMM; host MemAvailable fell {:.0} MiB per VM \
             (single VM: warm {:.0} MiB PSS)",
            l.concurrency,
            l.idle_vm_at_n.rss_mib,
            l.idle_vm_at_n.pss_mib,
            l.host_memory_per_vm_mib,
            r.idle_warm_vm.pss_mib
        );
    }
}

fn tempfile_dir(what: &str) -> std::io::Result<PathBuf> {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("banger-bench-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
