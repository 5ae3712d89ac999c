//! bangerd: the daemon that owns every banger VM, image, disk, network device and guest session.
//!
//! Layers, outside in:
//! - `front`: the two front doors on one Unix socket, JSON-RPC (jsonrpsee) and MCP (rmcp). They only
//!   translate; every operation goes through `Engine::dispatch`.
//! - `engine`: one typed handler per operation in `tools_schema::ops`, the only place that changes state.
//! - `vmm`, `guest`, `store`, `host`: the parts the engine drives (VMM processes, the guest agent channel,
//!   SQLite, host facts).
pub mod config;
pub mod daemon;
pub mod engine;
pub mod front;
pub mod host;
pub mod logging;
pub mod network;
pub mod probe;
#[cfg(test)]
mod source_scan;
pub mod ssh_config;
pub mod store;

// The VMM drivers and the guest channel live in their own crate (`server/vmm`), under their old paths.
pub use banger_vmm as vmm;
pub use banger_vmm::{guest, host_files, hybrid_vsock};

pub use config::Config;
pub use engine::{CallContext, Engine};
