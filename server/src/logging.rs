//! Structured logs: JSON lines to the daemon's log file, and JSON or text to stderr.
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Installs the global subscriber. `level` is a level name or an env-filter directive; `RUST_LOG`
/// overrides it.
pub fn init(level: &str, stderr_format: &str, file: Option<&Path>) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level));
    let stderr_layer = match stderr_format {
        "text" => fmt::layer().with_writer(std::io::stderr).with_filter(filter()?).boxed(),
        _ => fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).with_filter(filter()?).boxed(),
    };
    let file_layer = match file {
        Some(path) => {
            // 0600: the log names VMs, paths and errors quoting guests; only the daemon's user reads it.
            let f = Arc::new(OpenOptions::new().create(true).append(true).mode(0o600).open(path)?);
            Some(fmt::layer().json().flatten_event(true).with_ansi(false).with_writer(f).with_filter(filter()?))
        }
        None => None,
    };
    tracing_subscriber::registry().with(stderr_layer).with(file_layer).try_init()?;
    Ok(())
}
