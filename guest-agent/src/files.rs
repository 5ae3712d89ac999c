//! File reads and writes for the host: raw bytes in data frames, so binary content and any size cost nothing
//! extra; the host chunks large files by offset.
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use tokio::sync::mpsc;
use tools_schema::guest::{Frame, FrameKind, GuestErrorKind, GuestResponse};

use crate::channel::respond;
use crate::exec::ExecInput;

const CHUNK: usize = 256 * 1024;

pub async fn write(
    stream: u32,
    path: String,
    mode: Option<u32>,
    append: bool,
    make_dirs: bool,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    out: mpsc::UnboundedSender<Frame>,
) {
    let result = async {
        let p = std::path::Path::new(&path);
        if make_dirs {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .mode(mode.unwrap_or(0o644))
            .open(p)?;
        let mut bytes = 0u64;
        loop {
            match input.recv().await {
                Some(ExecInput::Data(d)) => {
                    f.write_all(&d)?;
                    bytes += d.len() as u64;
                }
                Some(ExecInput::Eof) => break,
                Some(ExecInput::Cancel) | None => {
                    return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "write cancelled by the host"))
                }
            }
        }
        f.sync_all()?;
        if let Some(m) = mode {
            // An existing file keeps its old mode through open(); set the one asked for.
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))?;
        }
        Ok::<_, std::io::Error>((bytes, f.metadata()?.len()))
    }
    .await;
    let response = match result {
        Ok((bytes, size)) => GuestResponse::Written { bytes, size },
        Err(e) => GuestResponse::error(io_kind(&e), format!("cannot write {path}: {e}")),
    };
    respond(&out, stream, response);
}

pub fn read(stream: u32, path: &str, offset: u64, limit: u64, out: &mpsc::UnboundedSender<Frame>) {
    let result = (|| {
        let mut f = std::fs::File::open(path)?;
        let meta = f.metadata()?;
        if meta.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "is a directory"));
        }
        f.seek(SeekFrom::Start(offset))?;
        let mut left = limit;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let n = f.read(&mut buf[..(left.min(CHUNK as u64) as usize)])?;
            if n == 0 {
                break;
            }
            let _ = out.send(Frame::new(FrameKind::Stdout, stream, buf[..n].to_vec()));
            left -= n as u64;
        }
        Ok::<_, std::io::Error>((meta.len(), meta.permissions().mode() & 0o7777))
    })();
    let response = match result {
        Ok((size, mode)) => GuestResponse::FileData { size, mode },
        Err(e) => GuestResponse::error(io_kind(&e), format!("cannot read {path}: {e}")),
    };
    respond(out, stream, response);
}

/// What a failed file operation tells the host: a missing file is `NotFound`; a path that cannot be used as
/// asked (a directory, a file of the wrong type, no permission, a bad name) is the caller's `Invalid`;
/// anything else (an I/O error, a full disk) is `Other`.
fn io_kind(e: &std::io::Error) -> GuestErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => GuestErrorKind::NotFound,
        K::InvalidInput
        | K::InvalidFilename
        | K::PermissionDenied
        | K::IsADirectory
        | K::NotADirectory
        | K::ReadOnlyFilesystem
        | K::AlreadyExists => GuestErrorKind::Invalid,
        _ => GuestErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_carry_the_kind_the_host_maps() {
        let open = |p: &str| std::fs::File::open(p).unwrap_err();
        assert_eq!(io_kind(&open("/nonexistent/banger-test")), GuestErrorKind::NotFound);
        let dir = std::env::temp_dir();
        let write_to_dir = std::fs::OpenOptions::new().write(true).open(&dir).unwrap_err();
        assert_eq!(io_kind(&write_to_dir), GuestErrorKind::Invalid);
        let under_a_file = std::fs::File::open("/proc/self/status/x").unwrap_err();
        assert_eq!(io_kind(&under_a_file), GuestErrorKind::Invalid, "{under_a_file:?}");
        assert_eq!(io_kind(&std::io::Error::other("disk on fire")), GuestErrorKind::Other);
    }
}
