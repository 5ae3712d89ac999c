//! banger's client side, shared by the `banger` CLI and anything else that talks to `bangerd`: the typed
//! JSON-RPC client over the daemon's Unix socket (`rpc`), and where the daemon's socket and state are
//! (`paths`). It never links the daemon: the CLI depends on this crate and `tools-schema` only.
pub mod next_step;
pub mod paths;
pub mod rpc;

pub use rpc::{CallError, Daemon};
