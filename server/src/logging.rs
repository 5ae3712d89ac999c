//! Structured logs: JSON lines to the daemon's log file, and JSON or text to stderr.
//!
//! The log file is bounded: past `MAX_LOG_BYTES` it is renamed to `<name>.1` (replacing the previous one)
//! and a new file is started, so the daemon's logs never take more than twice that. Lines a peer can
//! trigger at will are rate-limited where they are logged (`guest::RateLimited`), and hickory's per-query
//! lines are kept below INFO.
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Size at which the daemon's log file is rotated.
pub const MAX_LOG_BYTES: u64 = 32 << 20;

/// Installs the global subscriber. `level` is a level name or an env-filter directive; `RUST_LOG`
/// overrides it.
pub fn init(level: &str, stderr_format: &str, file: Option<&Path>) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(with_quiet_dns(level)));
    let stderr_layer = match stderr_format {
        "text" => fmt::layer().with_writer(std::io::stderr).with_filter(filter()?).boxed(),
        _ => fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).with_filter(filter()?).boxed(),
    };
    let file_layer = match file {
        Some(path) => {
            let f = RotatingFile::open(path, MAX_LOG_BYTES)?;
            Some(fmt::layer().json().flatten_event(true).with_ansi(false).with_writer(f).with_filter(filter()?))
        }
        None => None,
    };
    tracing_subscriber::registry().with(stderr_layer).with(file_layer).try_init()?;
    Ok(())
}

/// hickory logs every query it answers at INFO; a guest can send thousands a second. Unless the level names
/// hickory itself, its crates log warnings only.
fn with_quiet_dns(level: &str) -> String {
    if level.contains("hickory") {
        level.to_string()
    } else {
        format!("{level},hickory_server=warn,hickory_proto=warn")
    }
}

/// An append-only log file that rotates to `<path>.1` when it reaches `max` bytes.
#[derive(Clone)]
pub struct RotatingFile {
    inner: Arc<Mutex<Rotating>>,
}

struct Rotating {
    path: PathBuf,
    file: File,
    len: u64,
    max: u64,
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl RotatingFile {
    pub fn open(path: &Path, max: u64) -> std::io::Result<RotatingFile> {
        let file = open_log(path)?;
        let len = file.metadata()?.len();
        Ok(RotatingFile { inner: Arc::new(Mutex::new(Rotating { path: path.to_path_buf(), file, len, max })) })
    }
}

impl Rotating {
    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open_log(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for &RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut r = self.inner.lock();
        if r.len > 0 && r.len + buf.len() as u64 > r.max {
            // A failed rotation keeps writing to the old file rather than losing lines.
            let _ = r.rotate();
        }
        let n = r.file.write(buf)?;
        r.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.lock().file.flush()
    }
}

impl<'a> fmt::MakeWriter<'a> for RotatingFile {
    type Writer = &'a RotatingFile;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_to_one_old_file_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bangerd.log");
        let log = RotatingFile::open(&path, 1000).unwrap();
        for _ in 0..100 {
            (&log).write_all(&[b'x'; 99]).unwrap();
            (&log).write_all(b"\n").unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&path) <= 1000);
        assert!(size(&dir.path().join("bangerd.log.1")) <= 1000);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn hickory_is_quiet_unless_asked_for() {
        assert_eq!(with_quiet_dns("info"), "info,hickory_server=warn,hickory_proto=warn");
        assert_eq!(with_quiet_dns("hickory_server=debug"), "hickory_server=debug");
    }
}
