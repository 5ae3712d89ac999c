//! For the tests that read the daemon's own sources to guard an invariant (no text classification, a hint on
//! every error, no VmmKind branch): the one walk over its `.rs` files.
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` (relative to the server crate), with its code before `#[cfg(test)]`: unit
/// tests may name what the rule forbids.
pub(crate) fn daemon_sources(dir: &str) -> Vec<(PathBuf, String)> {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)];
    let mut sources = vec![];
    while let Some(path) = dirs.pop() {
        if path.is_dir() {
            dirs.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
            sources.push((path, code));
        }
    }
    sources
}
