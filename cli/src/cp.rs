//! `banger vm cp`: files of any size in or out of a VM, in chunks of the API's 8 MiB limit, binary-safe
//! (base64 on the wire), with the permission bits kept and a sha256 of what arrived.
use std::io::{Read, Write};
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
            let tmp = format!("{dst}.banger-part");
            let mut f = std::fs::File::create(&tmp).map_err(|e| anyhow::anyhow!("cannot write {dst}: {e}"))?;
            let (mut hash, mut offset) = (sha2::Sha256::new(), 0u64);
            let mode = loop {
                let p = VmFileReadParams {
                    vm: vm.clone(),
                    path: path.clone(),
                    offset: Some(offset),
                    limit: None,
                    encoding: Some(ContentEncoding::Base64),
                };
                let r = match d.call::<ops::VmFileRead>(&p).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e.into());
                    }
                };
                let data = b64.decode(r.content.as_bytes())?;
                hash.update(&data);
                f.write_all(&data)?;
                offset += data.len() as u64;
                if r.eof || data.is_empty() {
                    break u32::from_str_radix(&r.mode, 8).unwrap_or(0o644);
                }
            };
            f.sync_all()?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, dst)?;
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
