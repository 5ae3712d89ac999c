//! vm.file_write and vm.file_read through the guest channel.
use super::*;

impl Engine {
    pub async fn vm_file_write(
        self: &Arc<Self>,
        p: VmFileWriteParams,
        ctx: CallContext,
    ) -> Result<VmFileWriteResult, ApiError> {
        use base64::Engine as _;
        if !p.path.starts_with('/') {
            return Err(ApiError::invalid(format!("path must be absolute, got `{}`", p.path))
                .with_hint("give the path from the guest's root, e.g. /root/file"));
        }
        let mode = p
            .mode
            .as_deref()
            .map(parse_mode)
            .transpose()
            .map_err(|e| ApiError::invalid(e).with_hint("give the mode as octal digits, e.g. 644 or 0755"))?;
        let data = match p.encoding.unwrap_or(ContentEncoding::Text) {
            ContentEncoding::Text => p.content.into_bytes(),
            ContentEncoding::Base64 => {
                base64::engine::general_purpose::STANDARD.decode(p.content.as_bytes()).map_err(|e| {
                    ApiError::invalid(format!("content is not valid base64: {e}"))
                        .with_hint("send text as it is, or base64 of the bytes with encoding: base64")
                })?
            }
        };
        if data.len() as u64 > MAX_FILE_CHUNK {
            return Err(ApiError::invalid(format!(
                "content is {} bytes; at most {MAX_FILE_CHUNK} per call",
                data.len()
            ))
            .with_hint("write bigger files in chunks: the first call, then more with append: true"));
        }
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let size =
            conn.write_file(&p.path, mode, p.append, &data, &ctx.cancel).await.map_err(|e| file_error(&row.name, e))?;
        Ok(VmFileWriteResult {
            path: p.path,
            bytes: data.len() as u64,
            size,
            sha256: hex::encode(sha2::Sha256::digest(&data)),
        })
    }

    pub async fn vm_file_read(
        self: &Arc<Self>,
        p: VmFileReadParams,
        ctx: CallContext,
    ) -> Result<VmFileReadResult, ApiError> {
        if !p.path.starts_with('/') {
            return Err(ApiError::invalid(format!("path must be absolute, got `{}`", p.path))
                .with_hint("give the path from the guest's root, e.g. /root/file"));
        }
        let limit = p.limit.unwrap_or(MAX_FILE_CHUNK);
        if limit == 0 || limit > MAX_FILE_CHUNK {
            return Err(ApiError::invalid(format!("limit must be between 1 and {MAX_FILE_CHUNK}, got {limit}"))
                .with_hint("read in pieces: ask for a smaller limit and go on from next_offset"));
        }
        let offset = p.offset.unwrap_or(0);
        let row = self.resolve_vm(&p.vm).await?;
        let conn = self.guest(&row).await?;
        let (data, size, mode) =
            conn.read_file(&p.path, offset, limit, &ctx.cancel).await.map_err(|e| file_error(&row.name, e))?;
        let end = offset + data.len() as u64;
        let sha256 = hex::encode(sha2::Sha256::digest(&data));
        let (content, encoding) = encode_chunk(&data, p.encoding, &p.path)?;
        Ok(VmFileReadResult {
            path: p.path,
            content,
            encoding,
            offset,
            bytes: end - offset,
            size,
            eof: end >= size,
            next_offset: (end < size).then_some(end),
            mode: format!("{mode:04o}"),
            sha256,
        })
    }
}
