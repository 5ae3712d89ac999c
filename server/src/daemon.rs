//! Daemon start-up and shutdown.
use std::sync::Arc;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::store::Store;

/// The daemon's umask: whatever it or its children (qemu-img, mkfs, cp, SQLite) create is its own alone
/// unless it says otherwise (the socket, opened to its group explicitly).
const DAEMON_UMASK: u32 = 0o077;

/// Makes the state directory private before anything is written into it: the daemon's umask, the directory
/// 0700 (0750 and the socket group's, when one is configured: its members may enter, never read a file),
/// and every file and directory already below it stripped of group and other permissions (state left by
/// older versions: disks, database, logs and images were world-readable, and they hold guests' work disks
/// and sessions' secrets). Idempotent; `main` runs it before the log file is opened, `run` again.
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(DAEMON_UMASK));
    let state = &cfg.state_dir;
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let group = match cfg.socket_group.as_deref() {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("socket_group `{g}` is not a group on this host"))?,
        ),
        None => None,
    };
    let dir_mode = match &group {
        Some(g) => {
            nix::unistd::chown(state, None, Some(g.gid)).with_context(|| format!("chgrp {}", state.display()))?;
            0o750
        }
        None => 0o700,
    };
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(dir_mode))
        .with_context(|| format!("chmod {}", state.display()))?;
    for d in [cfg.images_dir(), cfg.vms_dir()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    make_private_below(state).with_context(|| format!("making {} private", state.display()))
}

/// Strips group and other permissions from every regular file and directory below `dir`, never following a
/// symlink (sockets and links keep theirs: the socket's access is the peer-credential check).
fn make_private_below(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match std::fs::symlink_metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if (meta.is_file() || meta.is_dir()) && mode & 0o7077 != 0 {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        if meta.is_dir() {
            make_private_below(&entry.path())?;
        }
    }
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT. VMs keep running when it exits; the next start adopts them.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    prepare_state_dir(&cfg)?;
    // One daemon per state directory: a second one would fight the first over VMs and the database.
    let lock_path = cfg.state_dir.join("bangerd.lock");
    let lock_file =
        crate::host_files::create_private(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another bangerd already owns {} ({e}); stop it first: banger daemon stop",
            cfg.state_dir.display()
        )
    })?;
    // Detached VMM processes are reparented to us rather than to PID 1 (which may not reap at all in a
    // container), so we can reap them when they exit.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; exited VMMs are left to init to reap");
    }
    let store = Store::open(&cfg.db_path()).with_context(|| format!("opening {}", cfg.db_path().display()))?;
    let engine = Engine::new(cfg.clone(), store);
    tracing::info!(
        build = %tools_schema::BuildInfo::current(),
        socket = %cfg.socket.display(),
        state_dir = %cfg.state_dir.display(),
        vmm = engine.vmm().vmm.as_str(),
        reason = %engine.vmm().reason,
        "bangerd starting"
    );
    engine.reconcile().await.map_err(|e| anyhow::anyhow!("reconciling VM state: {}", e.message))?;
    let shutdown = CancellationToken::new();
    engine.start_network(shutdown.clone()).await?;
    if let Err(e) = ensure_ssh_key(&cfg.ssh_key()).await {
        tracing::warn!(error = %e, "no SSH key for guests; `vm ssh` will not work");
    }
    engine.prune_host_keys().await;
    if cfg.manage_ssh_config {
        let path = cfg.ssh_config_path();
        let known_hosts = crate::ssh_config::known_hosts_path(&cfg.state_dir);
        match crate::ssh_config::sync(&path, &cfg.ssh_key(), &known_hosts) {
            Ok(true) => tracing::info!(path = %path.display(), "updated the managed *.vm block"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot manage the ssh config block; `ssh <name>.vm` needs it"),
        }
    }
    let (listener, access) = crate::front::bind(&cfg.socket, cfg.socket_group.as_deref()).await?;
    let server = tokio::spawn(crate::front::serve(listener, access, Arc::clone(&engine), shutdown.clone()));
    // The console is a convenience: a taken port must not keep the daemon (and its VMs) from serving.
    let web = if cfg.web.enabled {
        crate::front::web::start(Arc::clone(&engine), shutdown.clone())
            .await
            .inspect_err(|e| tracing::warn!(error = format!("{e:#}"), "web console disabled"))
            .ok()
    } else {
        None
    };
    engine.settle_vmm_choice().await;
    tokio::spawn(Arc::clone(&engine).bound_console_logs(shutdown.clone()));
    tracing::info!("bangerd ready");
    engine.refill_pool_later();
    wait_for_signal().await;
    tracing::info!("bangerd stopping; VMs keep running and are re-adopted at the next start");
    shutdown.cancel();
    // Pooled VMs have no record: end them rather than leave them for the next start to find as orphans.
    engine.drain_pool().await;
    let _ = server.await;
    if let Some(web) = web {
        let _ = web.await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// Generates the managed ed25519 key on first use (ssh-keygen from openssh-client; the key never leaves
/// the host, only its public half goes into guests).
async fn ensure_ssh_key(key: &std::path::Path) -> anyhow::Result<()> {
    if key.exists() && key.with_extension("pub").exists() {
        return Ok(());
    }
    if let Some(dir) = key.parent() {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger-managed", "-f"])
        .arg(key)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running ssh-keygen ({e}); apt-get install openssh-client"))?;
    anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr).trim());
    tracing::info!(key = %key.display(), "generated the managed SSH key");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
