//! `banger vm cp`: files of any size in or out of a VM, in chunks of the API's 8 MiB limit, binary-safe
//! (base64 on the wire), with the permission bits kept (out of a VM: only rwx, less the umask) and a sha256
//! of what arrived.
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use base64::Engine as _;
use serde::Serialize;
use sha2::Digest;
use tools_schema::ops;
use tools_schema::vm::{ContentEncoding, VmFileReadParams, VmFileWriteParams, MAX_FILE_CHUNK};

use crate::client::Daemon;

#[derive(Serialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `VM:/path` -> Some((vm, path)); a local path -> None.
fn remote(spec: &str) -> Option<(String, String)> {
    let (vm, path) = spec.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then(|| (vm.to_string(), path.to_string()))
}

pub async fn copy(d: &Daemon, src: &str, dst: &str) -> anyhow::Result<CopyReport> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match (remote(src), remote(dst)) {
        (None, Some((vm, path))) => {
            let mut f = std::fs::File::open(src).map_err(|e| anyhow::anyhow!("cannot read {src}: {e}"))?;
            let mode = f.metadata()?.permissions().mode() & 0o7777;
            let (mut hash, mut total, mut first) = (sha2::Sha256::new(), 0u64, true);
            let mut buf = vec![0u8; MAX_FILE_CHUNK as usize];
            loop {
                let n = read_full(&mut f, &mut buf)?;
                if n == 0 && !first {
                    break;
                }
                hash.update(&buf[..n]);
                let p = VmFileWriteParams {
                    vm: vm.clone(),
                    path: path.clone(),
                    content: b64.encode(&buf[..n]),
                    encoding: Some(ContentEncoding::Base64),
                    mode: first.then(|| format!("{mode:04o}")),
                    append: !first,
                };
                d.call::<ops::VmFileWrite>(&p).await?;
                total += n as u64;
                first = false;
                if n < buf.len() {
                    break;
                }
            }
            Ok(CopyReport { from: src.into(), to: dst.into(), bytes: total, sha256: hex::encode(hash.finalize()) })
        }
        (Some((vm, path)), None) => {
            // Guest bytes, guest mode: written beside `dst` under a fresh name and renamed into place whole,
            // with only the permission bits of the guest's mode (see host_file).
            let mut f = crate::host_file::create_beside(std::path::Path::new(dst))
                .map_err(|e| anyhow::anyhow!("cannot write {dst}: {e}"))?;
            let (mut hash, mut offset) = (sha2::Sha256::new(), 0u64);
            // The size the guest reported first bounds the copy: a guest that never says eof cannot fill the
            // host's disk.
            let mut limit: Option<u64> = None;
            let mode = loop {
                let p = VmFileReadParams {
                    vm: vm.clone(),
                    path: path.clone(),
                    offset: Some(offset),
                    limit: None,
                    encoding: Some(ContentEncoding::Base64),
                };
                let r = d.call::<ops::VmFileRead>(&p).await?;
                let data = b64.decode(r.content.as_bytes())?;
                let limit = *limit.get_or_insert(r.size);
                if offset + data.len() as u64 > limit {
                    anyhow::bail!(
                        "{src}: the VM sent more than the {limit} bytes it reported; nothing was written to {dst}"
                    );
                }
                hash.update(&data);
                f.write_all(&data)?;
                offset += data.len() as u64;
                if r.eof || data.is_empty() || offset == limit {
                    break r.mode;
                }
            };
            f.commit(crate::host_file::safe_mode(Some(&mode)))?;
            Ok(CopyReport { from: src.into(), to: dst.into(), bytes: offset, sha256: hex::encode(hash.finalize()) })
        }
        _ => anyhow::bail!("exactly one side must be VM:/absolute/path, e.g. `banger vm cp ./f dev:/root/f`"),
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
