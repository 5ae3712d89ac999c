//! What a VM is doing: stats, listening ports, console logs, and keeping those logs bounded.
use super::*;
use crate::host_files::read_tail;

/// Most of a console log kept before it is rotated (to `console.log.1`): a guest printing without pause costs
/// at most about twice this on disk, plus what it prints between two checks.
pub(super) const CONSOLE_MAX_BYTES: u64 = 4 << 20;
pub(super) const CONSOLE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How much of the end of a log is read to find its last lines.
pub(super) const TAIL_READ_BYTES: u64 = 1 << 20;

/// `<path>.1`: where a rotated log's previous part is.
pub(super) fn rotated(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    p.into()
}

/// Moves a console log that outgrew `max` to `.1` and empties it. The VMM keeps its descriptor (QEMU's
/// chardev with `append=on`, Firecracker's stdout opened O_APPEND), so it goes on writing at the new end of
/// the same file: a copy and a truncate, not a rename. Lines written between the two are lost.
pub(super) fn rotate_console(path: &std::path::Path, max: u64) -> std::io::Result<()> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(());
    }
    let mut from = std::fs::File::open(path)?;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut to = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(rotated(path))?;
    // At most `max` bytes (the end) go to `.1`, so it stays bounded even when a check came late.
    use std::io::{Seek, SeekFrom};
    from.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    std::io::copy(&mut std::io::Read::take(&mut from, max), &mut to)?;
    std::fs::OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// The last `lines` non-blank lines of a log (the console, a helper's), for errors about guests that never answered.
pub(super) fn log_tail(path: &std::path::Path, lines: usize) -> String {
    crate::host_files::log_tail(path, lines, TAIL_READ_BYTES)
}

impl Engine {
    pub async fn vm_stats(self: &Arc<Self>, p: VmRef, ctx: CallContext) -> Result<VmStats, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let disk = self.vm_paths(&row.id).root_disk();
        let (mut cpu, mut rss) = (None, None);
        if let Some(pid) = row.pid.filter(|_| self.is_alive(&row)) {
            // The VMM's CPU time (user + system) and resident memory, from /proc through procfs.
            if let Ok(vmm) = procfs::process::Process::new(pid as i32) {
                if let Ok(stat) = vmm.stat() {
                    cpu = Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64);
                }
                rss = vmm.status().ok().and_then(|s| s.vmrss).map(|kib| kib * 1024);
            }
        }
        let guest = if row.state == VmState::Running {
            let conn = self.guest(&row).await?;
            match conn.request(&GuestRequest::Stats, Duration::from_secs(5), &ctx.cancel).await {
                Ok(tools_schema::guest::GuestResponse::Stats(s)) => Some(s),
                Ok(_) | Err(_) => None,
            }
        } else {
            None
        };
        use std::os::unix::fs::MetadataExt;
        Ok(VmStats {
            name: row.name.clone(),
            state: row.state,
            host_cpu_seconds: cpu,
            host_rss_bytes: rss,
            disk_bytes: vmm::qcow2_virtual_size(&disk),
            disk_host_bytes: std::fs::metadata(&disk).ok().map(|m| m.blocks() * 512),
            guest,
        })
    }

    pub async fn vm_ports(self: &Arc<Self>, p: VmRef, ctx: CallContext) -> Result<VmPorts, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let listeners = match conn.request(&GuestRequest::Ports, Duration::from_secs(10), &ctx.cancel).await {
            Ok(tools_schema::guest::GuestResponse::Ports { listeners }) => listeners,
            Ok(other) => return Err(guest_error(&row.name, GuestError::protocol(format!("{other:?}")))),
            Err(e) => return Err(guest_error(&row.name, e)),
        };
        let host = format!("{}.vm", row.name);
        let mut seen = std::collections::HashSet::new();
        let mut ports = vec![];
        for l in listeners {
            let loopback = l.address.starts_with("127.") || l.address == "::1";
            // 0.0.0.0 and :: on one port are one service: show it once.
            if !seen.insert((l.proto.clone(), l.port, loopback)) {
                continue;
            }
            let mut proto = if l.proto == "udp" { PortProtocol::Udp } else { PortProtocol::Tcp };
            let endpoint = if loopback {
                format!("{}:{} (guest only)", l.address, l.port)
            } else {
                if proto == PortProtocol::Tcp {
                    if let Some(ip) = row.ip {
                        proto = match crate::probe::probe(std::net::SocketAddr::from((ip, l.port)), &host).await {
                            crate::probe::Speaks::Tls => PortProtocol::Https,
                            crate::probe::Speaks::Http => PortProtocol::Http,
                            crate::probe::Speaks::Unknown => PortProtocol::Tcp,
                        };
                    }
                }
                match proto {
                    PortProtocol::Https => format!("https://{host}:{}/", l.port),
                    PortProtocol::Http => format!("http://{host}:{}/", l.port),
                    _ => format!("{host}:{}", l.port),
                }
            };
            ports.push(VmPort {
                proto,
                endpoint,
                port: l.port,
                bind: l.address,
                pid: l.pid,
                process: l.process,
                command: l.command,
            });
        }
        Ok(VmPorts { vm: row.name, ports })
    }

    pub async fn vm_logs(self: &Arc<Self>, p: VmLogsParams, _: CallContext) -> Result<VmLogs, ApiError> {
        let row = self.resolve_vm(&p.vm).await?;
        let tail = p.tail.unwrap_or(200) as usize;
        let path = self.vm_paths(&row.id).console_log();
        let read_path = path.clone();
        // Only the end of the console is read (the guest writes it; it is bounded by rotation anyway): the
        // current file's last TAIL_READ_BYTES, and the rotated one's when that holds too few lines.
        let lines = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let mut text = read_tail(&read_path, TAIL_READ_BYTES)?;
            let enough = |t: &[u8]| t.iter().filter(|b| **b == b'\n').count() > tail;
            if !enough(&text) {
                let mut older = read_tail(&rotated(&read_path), TAIL_READ_BYTES)?;
                older.extend_from_slice(&text);
                text = older;
            }
            Ok(String::from_utf8_lossy(&text).lines().map(str::to_string).collect())
        })
        .await
        .map_err(|e| ApiError::internal(format!("console read task: {e}")).with_hint(crate::engine::errors::hint::BUG))?
        .map_err(|e| {
            ApiError::internal(format!("reading {}: {e}", path.display()))
                .with_hint("check that the VM's console log in its directory is readable by the daemon")
        })?;
        let start = lines.len().saturating_sub(tail);
        Ok(VmLogs { lines: lines[start..].to_vec(), path: path.display().to_string() })
    }

    /// Keeps every running VM's console log under `CONSOLE_MAX_BYTES` (a guest can print as fast as it likes)
    /// until `shutdown`: see `rotate_console`.
    pub async fn bound_console_logs(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CONSOLE_CHECK_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            let Ok(rows) = self.store.vms().await else { continue };
            let paths: Vec<_> = rows
                .iter()
                .filter(|r| matches!(r.state, VmState::Running | VmState::Starting | VmState::Stopping))
                .map(|r| self.vm_paths(&r.id).console_log())
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for p in paths {
                    if let Err(e) = rotate_console(&p, CONSOLE_MAX_BYTES) {
                        tracing::debug!(path = %p.display(), error = %e, "cannot rotate a console log");
                    }
                }
            })
            .await;
        }
    }
}
