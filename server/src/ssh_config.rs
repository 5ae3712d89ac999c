//! The managed `Host *.vm` block in the user's `~/.ssh/config`, so plain `ssh <name>.vm` works with banger's
//! key. The block is written at the top of the file (ssh takes the first value it finds for an option, so
//! it wins for `*.vm` whatever the rest says), everything outside the markers is preserved byte for byte,
//! and the file is replaced atomically with its mode and owner kept.
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub const BEGIN: &str = "# >>> banger: managed block for *.vm hosts (edits inside are overwritten) >>>";
pub const END: &str = "# <<< banger <<<";

#[derive(Debug, thiserror::Error)]
pub enum SshConfigError {
    #[error("{path} has a banger block start marker without its end marker; fix the file by hand")]
    Malformed { path: String },
    #[error("updating {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn render(identity: &Path) -> String {
    format!(
        "{BEGIN}\nHost *.vm\n    User root\n    IdentityFile {}\n    IdentitiesOnly yes\n    \
         StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n{END}\n",
        identity.display()
    )
}

/// Puts the current block into `path`, creating the file (and `~/.ssh`) if needed. Returns whether the
/// file changed.
pub fn sync(path: &Path, identity: &Path) -> Result<bool, SshConfigError> {
    let io_err = |source| SshConfigError::Io { path: path.display().to_string(), source };
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let rest = strip_block(existing.as_deref().unwrap_or(""))
        .ok_or_else(|| SshConfigError::Malformed { path: path.display().to_string() })?;
    let mut content = render(identity);
    if !rest.trim().is_empty() {
        content.push('\n');
        content.push_str(rest.trim_start_matches('\n'));
    }
    if existing.as_deref() == Some(content.as_str()) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
    }
    let meta = std::fs::metadata(path).ok();
    let tmp = dir.join(format!(".{}.banger-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("config")));
    let mut f = std::fs::File::create(&tmp).map_err(io_err)?;
    f.write_all(content.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    let mode = meta.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0o600);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    if let Some(m) = &meta {
        let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
    } else if let Ok(owner) = std::fs::metadata(dir) {
        // A new file belongs to whoever owns ~/.ssh, not to the daemon.
        let _ = std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid()));
    }
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(true)
}

/// The file without banger's block; `None` if a block is opened and never closed.
fn strip_block(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == BEGIN {
            inside = true;
        } else if trimmed == END && inside {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    (!inside).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_file_private_with_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ssh/config");
        assert!(sync(&path, Path::new("/keys/id")).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, render(Path::new("/keys/id")));
        assert!(text.contains("Host *.vm") && text.contains("IdentityFile /keys/id"));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn preserves_everything_else_and_replaces_an_old_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let user = "Host work\n    HostName work.example\n    User me\n\nMatch host *.internal\n    ForwardAgent no";
        std::fs::write(&path, user).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        sync(&path, Path::new("/old/key")).unwrap();
        assert!(sync(&path, Path::new("/new/key")).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(BEGIN), "block goes first so it takes precedence");
        assert_eq!(text.matches(BEGIN).count(), 1);
        assert!(!text.contains("/old/key"));
        assert!(text.ends_with(user), "user content kept byte for byte: {text:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640, "mode kept");
        assert!(!sync(&path, Path::new("/new/key")).unwrap(), "an up-to-date file is not rewritten");
    }

    #[test]
    fn a_block_without_its_end_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let broken = format!("Host a\n{BEGIN}\nHost *.vm\n");
        std::fs::write(&path, &broken).unwrap();
        assert!(matches!(sync(&path, Path::new("/k")), Err(SshConfigError::Malformed { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
    }
}
