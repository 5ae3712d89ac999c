//! image.register, image.list, image.show, image.promote, image.delete.
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tools_schema::daemon::Empty;
use tools_schema::image::{ImageDeleted, ImageInfo, ImageList, ImageRef, ImageRegisterParams};
use tools_schema::vm::validate_name;
use tools_schema::{ApiError, ErrorCode};

use super::{new_id, now, CallContext, Engine};
use crate::store::ImageRow;

/// Where an image's files come from.
pub(crate) struct ImageSources {
    pub kernel: PathBuf,
    pub kernel_elf: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub work_seed: Option<PathBuf>,
    /// Move the root filesystem and work seed instead of copying them (a build's own output).
    pub take_disks: bool,
}

impl Engine {
    /// The image as callers see it, with what its root filesystem provides.
    pub(crate) async fn image_info(&self, r: &ImageRow) -> ImageInfo {
        let debugfs = self.cfg.find_binary("debugfs");
        image_view(r, self.image_contents.provides(debugfs.as_deref(), &r.rootfs).await)
    }
}

fn image_view(r: &ImageRow, provides: Vec<String>) -> ImageInfo {
    ImageInfo {
        id: r.id.clone(),
        name: r.name.clone(),
        is_default: r.is_default,
        kernel: r.kernel.clone(),
        kernel_elf: r.kernel_elf.clone(),
        initrd: r.initrd.clone(),
        rootfs: r.rootfs.clone(),
        rootfs_bytes: r.rootfs_bytes,
        work_seed: r.work_seed.clone(),
        fingerprint: r.fingerprint.clone(),
        created_at: r.created_at,
        build_id: r.build_id.clone(),
        source: r.source.clone(),
        provides,
    }
}

impl Engine {
    pub async fn image_register(
        self: &Arc<Self>,
        p: ImageRegisterParams,
        ctx: CallContext,
    ) -> Result<ImageInfo, ApiError> {
        validate_name("image", &p.name).map_err(|e| {
            ApiError::invalid(e).with_hint("pick a name like `my-image-2`").with_next(
                "image.list",
                serde_json::json!({}),
                "shows the names in use",
            )
        })?;
        let sources: Vec<(&str, Option<&String>)> = vec![
            ("kernel", Some(&p.kernel)),
            ("kernel_elf", p.kernel_elf.as_ref()),
            ("initrd", p.initrd.as_ref()),
            ("rootfs", Some(&p.rootfs)),
            ("work_seed", p.work_seed.as_ref()),
        ];
        // With a socket group, users other than the daemon's may call: they get only what they could read.
        let others_may_call = self.cfg.socket_group.is_some();
        let mut opened = vec![];
        for (field, path) in &sources {
            if let Some(path) = path {
                opened.push(open_source(field, path, others_may_call)?);
            }
        }
        // Copied from the files just checked, by descriptor, never from paths that could be swapped since
        // (`cp` runs as a child of the daemon and reaches its descriptors through /proc/<daemon>/fd).
        let pid = std::process::id();
        let mut checked = opened.iter().map(|f| PathBuf::from(format!("/proc/{pid}/fd/{}", f.as_raw_fd())));
        let mut next = || checked.next().expect("one checked file per named source");
        let kernel = next();
        let kernel_elf = p.kernel_elf.as_ref().map(|_| next());
        let initrd = p.initrd.as_ref().map(|_| next());
        let rootfs = next();
        let work_seed = p.work_seed.as_ref().map(|_| next());
        let sources = ImageSources { kernel, kernel_elf, initrd, rootfs, work_seed, take_disks: false };
        let row = self.install_image(&p.name, sources, p.make_default, None, &ctx.cancel).await?;
        drop(opened);
        // The new image may be the default now, or named in warm.pools.
        self.refill_pool_later();
        Ok(self.image_info(&row).await)
    }

    /// Puts an image's files into the store (copied, or moved when `take_disks`), fingerprints them and
    /// records the image. The name is checked under the image lock; on any failure or cancel nothing is left.
    pub(crate) async fn install_image(
        self: &Arc<Self>,
        name: &str,
        sources: ImageSources,
        make_default: bool,
        build: Option<(String, String)>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<ImageRow, ApiError> {
        let _guard = self.image_lock.lock().await;
        if self.store.images().await?.iter().any(|i| i.name == name) {
            return Err(ApiError::new(ErrorCode::AlreadyExists, format!("an image named `{name}` already exists"))
                .with_hint("pick another name, or delete that image first")
                .with_next("image.delete", serde_json::json!({"image": name}), "deletes the existing image"));
        }
        let id = new_id();
        let dir = self.cfg.images_dir().join(&id);
        // Copy into the store off the async runtime; on any failure (or cancel) remove the partial copy.
        let engine = self.clone();
        let work = tokio::spawn({
            let dir = dir.clone();
            async move { engine.copy_image_files(&dir, &sources).await }
        });
        let copied = tokio::select! {
            r = work => r.map_err(|e| ApiError::internal(format!("image copy task: {e}")).with_hint(crate::engine::errors::hint::BUG))?,
            _ = cancel.cancelled() => Err(ApiError::new(ErrorCode::Cancelled, "image registration cancelled").with_hint("nothing was registered; register it again to retry")),
        };
        let (kernel, kernel_elf, initrd, rootfs, work_seed, fingerprint) = match copied {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let rootfs_bytes = std::fs::metadata(&rootfs).map(|m| m.len()).unwrap_or(0);
        let is_first = self.store.images().await?.is_empty();
        let (build_id, source) = build.unzip();
        let row = ImageRow {
            id,
            name: name.to_string(),
            kernel: kernel.display().to_string(),
            kernel_elf: kernel_elf.map(|k| k.display().to_string()),
            initrd: initrd.map(|k| k.display().to_string()),
            rootfs: rootfs.display().to_string(),
            rootfs_bytes,
            fingerprint,
            is_default: make_default || is_first,
            created_at: now(),
            work_seed: work_seed.display().to_string(),
            build_id,
            source,
        };
        if let Err(e) = self.store.insert_image(row.clone()).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        tracing::info!(image = %row.name, id = %row.id, fingerprint = %row.fingerprint, "image registered");
        Ok(row)
    }

    /// Copies the image's files into `dir` (sparse, so a mostly empty rootfs stays small) and fingerprints them.
    async fn copy_image_files(
        &self,
        dir: &Path,
        p: &ImageSources,
    ) -> Result<(PathBuf, Option<PathBuf>, Option<PathBuf>, PathBuf, PathBuf, String), ApiError> {
        tokio::fs::create_dir_all(dir).await.map_err(|e| {
            ApiError::internal(format!("creating {}: {e}", dir.display()))
                .with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
        let copy = |src: &Path, name: &'static str, take: bool| {
            let dst = dir.join(name);
            let src = src.to_path_buf();
            async move {
                let moved = take && tokio::fs::rename(&src, &dst).await.is_ok();
                if !moved {
                    crate::vmm::copy_sparse(&src, &dst).await.map_err(|e| {
                        ApiError::internal(format!("copying {}: {}", src.display(), super::errors::error_chain(&e)))
                            .with_hint("check that the source file is readable and the state directory has room for it")
                    })?;
                }
                Ok::<PathBuf, ApiError>(dst)
            }
        };
        let kernel = copy(&p.kernel, "vmlinuz", false).await?;
        let kernel_elf = match &p.kernel_elf {
            Some(k) => Some(copy(k, "vmlinux", false).await?),
            None => None,
        };
        let initrd = match &p.initrd {
            Some(k) => Some(copy(k, "initrd.img", false).await?),
            None => None,
        };
        let rootfs = copy(&p.rootfs, "rootfs.ext4", p.take_disks).await?;
        let work_seed = match &p.work_seed {
            Some(seed) => copy(seed, "work-seed.ext4", p.take_disks).await?,
            None => {
                // An empty /root, labelled so the guest finds it.
                let seed = dir.join("work-seed.ext4");
                crate::vmm::create_ext4_disk(&self.cfg, &seed, "banger-work", 1 << 30).await.map_err(|e| {
                    ApiError::new(
                        ErrorCode::HostUnsupported,
                        format!("making an empty work seed: {}", super::errors::error_chain(&e)),
                    )
                    .with_hint("apt-get install e2fsprogs")
                })?;
                seed
            }
        };
        // Read-only on the host too (every VM's overlay depends on the base never changing), and the daemon's
        // alone: an image can hold whatever its source held.
        let mut files = vec![kernel.clone(), rootfs.clone(), work_seed.clone()];
        files.extend(kernel_elf.clone());
        files.extend(initrd.clone());
        for f in &files {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(f, std::fs::Permissions::from_mode(crate::host_files::IMAGE_FILE));
        }
        let hashed = files.clone();
        let fingerprint = tokio::task::spawn_blocking(move || fingerprint(&hashed))
            .await
            .map_err(|e| {
                ApiError::internal(format!("fingerprint task: {e}")).with_hint(crate::engine::errors::hint::BUG)
            })?
            .map_err(|e| {
                ApiError::internal(format!("fingerprinting image: {e}")).with_hint(
                    "check that the image files are readable by the daemon and were not changed during the copy",
                )
            })?;
        Ok((kernel, kernel_elf, initrd, rootfs, work_seed, fingerprint))
    }

    pub async fn image_list(self: &Arc<Self>, _: Empty, _: CallContext) -> Result<ImageList, ApiError> {
        let mut images = vec![];
        for row in self.store.images().await? {
            images.push(self.image_info(&row).await);
        }
        Ok(ImageList { images })
    }

    pub async fn image_show(self: &Arc<Self>, p: ImageRef, _: CallContext) -> Result<ImageInfo, ApiError> {
        Ok(self.image_info(&self.resolve_image(Some(&p.image)).await?).await)
    }

    pub async fn image_promote(self: &Arc<Self>, p: ImageRef, _: CallContext) -> Result<ImageInfo, ApiError> {
        let _guard = self.image_lock.lock().await;
        let img = self.resolve_image(Some(&p.image)).await?;
        self.store.set_default_image(img.id.clone()).await?;
        self.refill_pool_later();
        Ok(self.image_info(&self.resolve_image(Some(&img.id)).await?).await)
    }

    pub async fn image_delete(self: &Arc<Self>, p: ImageRef, _: CallContext) -> Result<ImageDeleted, ApiError> {
        let _guard = self.image_lock.lock().await;
        let img = self.resolve_image(Some(&p.image)).await?;
        let users: Vec<String> =
            self.store.vms().await?.into_iter().filter(|v| v.image_id == img.id).map(|v| v.name).collect();
        if !users.is_empty() {
            return Err(ApiError::precondition(format!("image `{}` is used by VMs: {}", img.name, users.join(", ")))
                .with_hint("delete those VMs first")
                .with_next("vm.delete", serde_json::json!({"vm": users}), "deletes them (irreversible)"));
        }
        self.store.delete_image(img.id.clone()).await?;
        let _ = tokio::fs::remove_dir_all(self.cfg.images_dir().join(&img.id)).await;
        self.collect_templates().await;
        Ok(ImageDeleted { id: img.id, name: img.name })
    }

    /// Finds an image by name or id; `None` means the default image.
    pub(crate) async fn resolve_image(&self, r: Option<&str>) -> Result<ImageRow, ApiError> {
        let images = self.store.images().await?;
        match r {
            None => images.into_iter().find(|i| i.is_default).ok_or_else(|| {
                ApiError::precondition("no default image is registered")
                    .with_hint("run scripts/quickstart.sh on the daemon's host, or register an image as the default")
                    .with_next(
                        "image.register",
                        serde_json::json!({"name": "<name>", "kernel": "<kernel path>", "rootfs": "<ext4 path>", "make_default": true}),
                        "registers an image and makes it the default",
                    )
            }),
            Some(r) => images.into_iter().find(|i| i.name == r || i.id == r).ok_or_else(|| {
                ApiError::not_found(format!("no image named `{r}`"))
                    .with_hint("name an image by its name or id")
                    .with_next("image.list", serde_json::json!({}), "lists the registered images")
            }),
        }
    }
}

/// Opens an image source named by a caller, checked: an absolute path to a regular file (not a device, fifo
/// or socket, also not through a symlink), and, when users other than the daemon's may call
/// (`others_may_call`), readable by every local user, so nobody republishes into a VM what they could not
/// read themselves. (The daemon cannot tell which member of the socket group asked, so it asks for what any
/// of them could read.)
fn open_source(field: &str, path: &str, others_may_call: bool) -> Result<std::fs::File, ApiError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let pb = Path::new(path);
    if !pb.is_absolute() {
        return Err(ApiError::invalid(format!("{field} must be an absolute path, got `{path}`"))
            .with_hint("give the full path, e.g. $(realpath FILE)"));
    }
    let missing = |e: std::io::Error| {
        ApiError::invalid(format!("{field} `{path}` cannot be read: {e}"))
            .with_hint("build the image first: scripts/quickstart.sh does it")
    };
    // stat first, so a fifo or device is never even opened (opening either can block or act).
    let meta = std::fs::metadata(pb).map_err(missing)?;
    let not_regular = || {
        ApiError::invalid(format!("{field} `{path}` is not a regular file"))
            .with_hint("name an image file (ext4, kernel, initramfs), not a device, fifo or directory")
    };
    if !meta.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(pb)
        .map_err(missing)?;
    let opened = file.metadata().map_err(missing)?;
    if !opened.is_file() || opened.ino() != meta.ino() || opened.dev() != meta.dev() {
        return Err(not_regular());
    }
    if others_may_call {
        let refuse = |what: String| {
            ApiError::new(ErrorCode::PermissionDenied, format!("{field} `{path}`: {what}")).with_hint(
                "with a socket group every member may register images, so banger takes only files every local user \
                 can read: chmod o+r the file (and o+x its directories), or copy it somewhere readable",
            )
        };
        if opened.mode() & 0o004 == 0 {
            return Err(refuse("the file is not readable by every local user".into()));
        }
        let real = std::fs::canonicalize(pb).map_err(missing)?;
        for dir in real.ancestors().skip(1) {
            let m = std::fs::metadata(dir).map_err(missing)?;
            if m.mode() & 0o001 == 0 {
                return Err(refuse(format!("its directory {} is not searchable by every local user", dir.display())));
            }
        }
    }
    Ok(file)
}

/// Content fingerprint of the image files. Only data extents are read (holes are hashed by position), so a
/// sparse multi-GiB root filesystem costs what it holds, not its apparent size.
fn fingerprint(files: &[PathBuf]) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f)?;
        let len = file.metadata()?.len();
        h.update(len.to_le_bytes());
        let mut pos: i64 = 0;
        while (pos as u64) < len {
            let data = match nix::unistd::lseek(file.as_fd(), pos, nix::unistd::Whence::SeekData) {
                Ok(d) => d,
                Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
                Err(e) => return Err(e.into()),
            };
            let hole = nix::unistd::lseek(file.as_fd(), data, nix::unistd::Whence::SeekHole)?;
            h.update(data.to_le_bytes());
            file.seek(SeekFrom::Start(data as u64))?;
            let mut left = (hole - data) as usize;
            while left > 0 {
                let want = left.min(buf.len());
                let n = file.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                left -= n;
            }
            pos = hole;
        }
    }
    Ok(format!("sha256:{}", hex::encode(&h.finalize()[..16])))
}
