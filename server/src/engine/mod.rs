//! The engine: one typed handler per operation, and the only code that changes daemon state.
//!
//! `Engine::dispatch` is generated from `tools_schema::for_each_operation!`, so an operation is written
//! once (as `Engine::<tool name>`) and served identically over JSON-RPC and MCP. Handlers validate their
//! input again here, before touching any state, whatever the front door already checked.
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tools_schema::daemon::VmmChoice;
use tools_schema::{ApiError, ErrorCode};

use crate::config::Config;
use crate::store::Store;

mod admission;
mod arguments;
pub(crate) mod contain;
mod daemon_ops;
mod disks;
mod doctor;
pub(crate) mod errors;
mod guard;
mod guest_sync;
mod image;
mod image_build;
mod image_contents;
mod locks;
mod operation;
mod run;
mod session;
mod ssh;
mod vm;
mod vmm_trust;
mod warm;
mod workspace;

pub use session::SessionFollower;

/// Per-call context handed to every handler.
#[derive(Clone, Default)]
pub struct CallContext {
    /// Cancelled when the caller gives up (cancel request or disconnect). Handlers that create things
    /// roll them back when they see it.
    pub cancel: CancellationToken,
    /// Where long work reports progress, when the caller asked for it (MCP progress tokens).
    pub progress: Option<Arc<dyn ProgressSink>>,
}

/// Receives progress of long work: `progress` of `total` steps (a running step counts half), and what is
/// happening now.
pub trait ProgressSink: Send + Sync {
    fn report(&self, progress: f64, total: f64, message: String);
}

pub struct Engine {
    pub(crate) cfg: Config,
    pub(crate) store: Store,
    pub(crate) started: Instant,
    /// The VMM new VMs get (read it with `vmm()`); changes once Firecracker is proven (`vmm_trust.rs`).
    vmm: parking_lot::RwLock<VmmChoice>,
    /// What the host offers, classified once at start.
    pub(crate) accel: tools_schema::daemon::Acceleration,
    /// Each VM's lock, last boot and exec spool budget (`vm/state.rs`).
    pub(crate) vms: vm::Vms,
    /// Live guest connections of running VMs, and the one shared connect of each (`vm/channel.rs`).
    pub(crate) guests: vm::Guests,
    /// Serialises image registry changes (register, promote, delete).
    image_lock: tokio::sync::Mutex<()>,
    /// What each image's root filesystem provides, read once per file (`image_contents.rs`).
    pub(crate) image_contents: image_contents::ImageContents,
    /// Long-running operations, for operation.status / wait / cancel (`operation.rs`).
    pub(crate) ops: operation::Ops,
    /// The allocation lock and the boot slots (`admission.rs`).
    pub(crate) admission: admission::Admission,
    /// The VM network; set once at start-up, after reconcile, unless networking is disabled.
    pub(crate) net: std::sync::OnceLock<Arc<crate::network::Network>>,
    /// Which sessions have an attached client (one at a time).
    attachments: session::Attachments,
    /// The web console's login URL, once it listens (daemon.status reports it).
    pub(crate) web_url: std::sync::OnceLock<String>,
    /// Template locks and the warm pool (`warm/`).
    pub(crate) warm: warm::Warm,
    /// VM uids and the cgroup hierarchy (`contain.rs`).
    pub(crate) contain: contain::Contain,
}

impl Engine {
    pub fn new(cfg: Config, store: Store) -> Arc<Engine> {
        let accel = crate::host::acceleration();
        // Firecracker starts unproven; settle_vmm_choice looks up (or runs) its boot self-test.
        let proof = if cfg.find_binary("firecracker").is_some() {
            crate::host::FirecrackerProof::Unproven
        } else {
            crate::host::FirecrackerProof::NotInstalled
        };
        let vmm = parking_lot::RwLock::new(crate::host::choose_vmm(cfg.vmm, accel, &proof));
        let admission = admission::Admission::new(&cfg.limits);
        let contain = contain::Contain::new(&cfg.containment);
        Arc::new(Engine {
            cfg,
            store,
            started: Instant::now(),
            vmm,
            accel,
            vms: vm::Vms::default(),
            guests: vm::Guests::default(),
            image_lock: tokio::sync::Mutex::new(()),
            image_contents: image_contents::ImageContents::default(),
            admission,
            ops: operation::Ops::default(),
            net: std::sync::OnceLock::new(),
            attachments: session::Attachments::default(),
            web_url: std::sync::OnceLock::new(),
            warm: warm::Warm::default(),
            contain,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Records where the web console listens, for daemon.status.
    pub fn set_web_url(&self, url: String) {
        let _ = self.web_url.set(url);
    }

    pub fn network(&self) -> Option<&Arc<crate::network::Network>> {
        self.net.get()
    }

    /// Sets up the VM network for the VMs that survived reconcile (their TAPs, NAT rules and DNS names
    /// are kept; everything else of banger's is removed).
    pub async fn start_network(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if !self.cfg.network.enabled {
            tracing::info!("networking disabled in the config; VMs get no NIC");
            return Ok(());
        }
        let rows = self.store.vms().await?;
        let running: Vec<crate::network::RunningVm> = rows
            .iter()
            .filter(|r| r.state == tools_schema::vm::VmState::Running)
            .map(|r| crate::network::RunningVm {
                name: r.name.clone(),
                tap: r.tap.clone(),
                ip: r.ip,
                mac: r.mac.clone(),
                nat: r.nat,
            })
            .collect();
        let nft = self
            .cfg
            .find_binary("nft")
            .ok_or_else(|| anyhow::anyhow!("nft is not installed (apt-get install nftables)"))?;
        let net = crate::network::Network::setup(
            &self.cfg.network.bridge,
            self.cfg.network.subnet()?,
            self.cfg.network.tap_pool,
            nft,
            &running,
            shutdown,
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "setting up the VM network on bridge {}: {e}\n  hint: bangerd needs root (CAP_NET_ADMIN) for networking; \
                 or set `[network] enabled = false` in the config",
                self.cfg.network.bridge
            )
        })?;
        tracing::info!(bridge = %net.bridge, gateway = %net.gateway, subnet = %net.subnet, "VM network ready");
        let _ = self.net.set(Arc::new(net));
        Ok(())
    }

    pub(crate) fn vm_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.vms.lock(id)
    }
}

macro_rules! dispatch_table {
    ($( ($ty:ident, $handler:ident, $method:literal, $params:ty, $result:ty,
         $ro:literal, $destructive:literal, $idem:literal, $desc:literal) ),* $(,)?) => {
        impl Engine {
            /// Runs the operation named `method` with JSON params and returns its JSON result.
            pub async fn dispatch(
                self: &Arc<Self>,
                method: &str,
                params: serde_json::Value,
                ctx: CallContext,
            ) -> Result<serde_json::Value, ApiError> {
                match method {
                    $(
                        $method => {
                            let params: $params = arguments::decode($method, params)?;
                            let result: $result = self.$handler(params, ctx).await?;
                            serde_json::to_value(result).map_err(|e| ApiError::internal(format!("encoding result: {e}")).with_hint(crate::engine::errors::hint::BUG))
                        }
                    )*
                    other => Err(ApiError::new(ErrorCode::UnknownMethod, format!("unknown method `{other}`"))
                        .with_hint("MCP tools/list or docs/API.md lists every operation")),
                }
            }
        }
    };
}
tools_schema::for_each_operation!(dispatch_table);

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub(crate) fn new_id() -> String {
    let bytes: [u8; 8] = rand::random();
    hex::encode(bytes)
}
