//! banger's public wire surface, and nothing else.
//!
//! Every request, response and error type that crosses a process boundary lives here: the daemon's
//! operations (published as JSON-RPC methods, MCP tools and CLI commands), and the guest protocol spoken
//! between the daemon and `banger-agent`. The JSON Schemas of MCP tools and JSON-RPC params are generated
//! from these types with schemars; their doc comments become the schema descriptions.
//!
//! Invariant: this crate is synchronous and depends on nothing async (no tokio), so the guest agent,
//! the daemon, the CLI and external tooling can all share it.

pub mod boot;
pub mod build;
pub mod daemon;
pub mod doc;
pub mod error;
pub mod guest;
pub mod image;
pub mod operation;
pub mod ops;
pub mod portable;
pub mod session;
pub mod ssh;
pub mod toolsets;
pub mod vm;
pub mod workspace;

pub use build::BuildInfo;
pub use error::{ApiError, ErrorCode};
