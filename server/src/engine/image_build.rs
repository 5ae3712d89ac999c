//! image.build and image.build_begin: a root filesystem from a recipe (cached by the recipe's content) or from
//! a registered image, an optional host script, then the guest agent and a build stamp, assembled into ext4
//! and registered. Everything runs on the host; nothing here needs a guest or a guest's network.
//!
//! The build id names the build's inputs (recipe content or base image fingerprint, script, agent binary,
//! assembly script, size, kernel). It is stamped into the image as `/etc/banger/image.json` and kept in the
//! store, so building the same inputs under the same name again returns the existing image.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tools_schema::image::{ImageBuildParams, ImageBuildResult};
use tools_schema::operation::OperationInfo;
use tools_schema::{ApiError, ErrorCode};

use super::image::ImageSources;
use super::operation::Op;
use super::{CallContext, Engine};
use crate::config::is_executable;
use crate::store::ImageRow;

pub(crate) const BUILD_STAGES: &[&str] = &["rootfs", "customize", "assemble", "register"];

/// Default root filesystem size when neither the request, the recipe nor a base image says.
const DEFAULT_SIZE_GIB: u32 = 4;

/// Everything a build needs, resolved and checked before the operation starts.
struct BuildPlan {
    name: String,
    make_default: bool,
    no_cache: bool,
    from: BuildFrom,
    script: Option<PathBuf>,
    size_gib: u32,
    agent: PathBuf,
    assemble: PathBuf,
    kernel: PathBuf,
    kernel_elf: Option<PathBuf>,
    initrd: Option<PathBuf>,
    build_id: String,
    source: String,
    /// An image of this name with this build id is already registered.
    existing: Option<ImageRow>,
}

enum BuildFrom {
    /// `key` is the recipe's content hash: the cached root tar is `<cache>/rootfs/<name>-<key>.tar`.
    Recipe {
        name: String,
        dir: PathBuf,
        key: String,
    },
    Image(ImageRow),
}

impl Engine {
    /// Builds an image and waits for it, reporting stages as progress.
    pub async fn image_build(
        self: &Arc<Self>,
        p: ImageBuildParams,
        ctx: CallContext,
    ) -> Result<ImageBuildResult, ApiError> {
        let info = self.image_build_begin(p, ctx.clone()).await?;
        let op = self.ops.get(&info.id)?;
        let snap = super::operation::follow(&op, &ctx).await;
        match (snap.image_build, snap.error) {
            (Some(b), _) => Ok(b),
            (None, Some(e)) => Err(e),
            (None, None) => {
                Err(ApiError::internal("image build ended without a result")
                    .with_hint(crate::engine::errors::hint::BUG))
            }
        }
    }

    /// Checks the request and everything it names, then builds in the background. Argument errors come back
    /// at once; the build itself is reported through the operation.
    pub async fn image_build_begin(
        self: &Arc<Self>,
        p: ImageBuildParams,
        _: CallContext,
    ) -> Result<OperationInfo, ApiError> {
        p.validate().map_err(|e| ApiError::invalid(e).with_hint(crate::engine::errors::hint::SCHEMA))?;
        let plan = self.plan_build(p).await?;
        let op = self.ops.start("image.build", &plan.name, BUILD_STAGES);
        let (engine, running) = (self.clone(), op.clone());
        let work = async move {
            let work = engine.cfg.images_dir().join(format!(".build-{}", running.id()));
            let result = engine.run_build(&plan, &running, &work).await;
            // The work folder holds only intermediate files: the registered image was moved out of it.
            let _ = tokio::fs::remove_dir_all(&work).await;
            result
        };
        super::operation::run(&op, work, |b: &ImageBuildResult| b.clone().into());
        Ok(op.snapshot())
    }

    async fn plan_build(&self, p: ImageBuildParams) -> Result<BuildPlan, ApiError> {
        let recipes = self.cfg.recipes_dir();
        let assemble = recipes.join("assemble.sh");
        if !assemble.is_file() {
            return Err(ApiError::new(
                ErrorCode::HostUnsupported,
                format!("no image assembly script at {}", assemble.display()),
            )
            .with_hint("set recipes_dir in the daemon config to banger's images/ folder"));
        }
        let agent = self.cfg.agent_binary().filter(|a| a.is_file()).ok_or_else(|| {
            ApiError::new(ErrorCode::HostUnsupported, "cannot find the banger-agent binary to put into the image")
                .with_hint("install it next to bangerd (scripts/quickstart.sh does) or set agent_binary in the config")
        })?;
        let script = p.script.as_ref().map(PathBuf::from);
        if let Some(s) = &script {
            if !is_executable(s) {
                return Err(ApiError::invalid(format!("script `{}` is not an executable file", s.display()))
                    .with_hint(format!("chmod +x {}", s.display())));
            }
        }
        let (from, kernel, kernel_elf, initrd, default_size) = match (&p.recipe, &p.from_image) {
            (Some(recipe), _) => {
                let dir = if recipe.starts_with('/') { PathBuf::from(recipe) } else { recipes.join(recipe) };
                if !is_executable(&dir.join("recipe.sh")) {
                    let known = list_recipes(&recipes).join(", ");
                    return Err(ApiError::not_found(format!(
                        "no recipe `{recipe}` (no executable recipe.sh in {})",
                        dir.display()
                    ))
                    .with_hint(format!("recipes in {}: {known}", recipes.display())));
                }
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let key = recipe_key(&dir).map_err(|e| {
                    ApiError::internal(format!("reading recipe {}: {e}", dir.display()))
                        .with_hint("check that the recipe folder and its files are readable")
                })?;
                let size = std::fs::read_to_string(dir.join("size_gib")).ok().and_then(|s| s.trim().parse().ok());
                let (k, ke, i) = self.cfg.build_kernel();
                if !k.is_file() {
                    return Err(ApiError::new(
                        ErrorCode::HostUnsupported,
                        format!("no guest kernel at {}", k.display()),
                    )
                    .with_hint("run scripts/setup-host.sh (it builds the lean kernel), or set kernel in the config"));
                }
                (
                    BuildFrom::Recipe { name, dir, key },
                    k,
                    Some(ke).filter(|p| p.is_file()),
                    i.filter(|p| p.is_file()),
                    size,
                )
            }
            (None, Some(base)) => {
                let img = self.resolve_image(Some(base)).await?;
                let size = Some(img.rootfs_bytes.div_ceil(1 << 30) as u32);
                let (k, ke, i) = (
                    img.kernel.clone().into(),
                    img.kernel_elf.clone().map(Into::into),
                    img.initrd.clone().map(Into::into),
                );
                (BuildFrom::Image(img), k, ke, i, size)
            }
            (None, None) => unreachable!("validate() requires a recipe or a base image"),
        };
        let size_gib =
            p.size_gib.or(default_size).unwrap_or(DEFAULT_SIZE_GIB).clamp(1, tools_schema::image::MAX_IMAGE_GIB);

        // The build id: every input that changes what the image holds.
        let mut inputs: Vec<String> = match &from {
            BuildFrom::Recipe { name, key, .. } => vec![format!("recipe {name} {key}")],
            BuildFrom::Image(img) => vec![format!("image {}", img.fingerprint)],
        };
        let mut hashed = vec![agent.clone(), assemble.clone(), kernel.clone()];
        hashed.extend(script.clone());
        hashed.extend(initrd.clone());
        let digests = tokio::task::spawn_blocking(move || {
            hashed.iter().map(|f| file_sha256(f)).collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| ApiError::internal(format!("hashing task: {e}")).with_hint(crate::engine::errors::hint::BUG))?
        .map_err(|e| {
            ApiError::internal(format!("hashing build inputs: {e}"))
                .with_hint("check that the recipe, agent, kernel and assembly script named in the build are readable")
        })?;
        inputs.extend(digests);
        inputs.push(format!("size {size_gib}"));
        let build_id = hex::encode(&Sha256::digest(inputs.join("\n").as_bytes())[..8]);
        let source = match &from {
            BuildFrom::Recipe { name, .. } => format!("recipe {name}"),
            BuildFrom::Image(img) => format!("image {}", img.name),
        } + if script.is_some() { " + script" } else { "" };

        let existing = self.store.images().await?.into_iter().find(|i| i.name == p.name);
        if let Some(img) = &existing {
            if img.build_id.as_deref() != Some(build_id.as_str()) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("an image named `{}` already exists from other inputs", p.name),
                )
                .with_hint("pick another name, or delete that image first")
                .with_next(
                    "image.delete",
                    serde_json::json!({"image": p.name}),
                    "deletes the existing image",
                ));
            }
        }
        Ok(BuildPlan {
            name: p.name,
            make_default: p.make_default,
            no_cache: p.no_cache,
            from,
            script,
            size_gib,
            agent,
            assemble,
            kernel,
            kernel_elf,
            initrd,
            build_id,
            source,
            existing,
        })
    }

    async fn run_build(self: &Arc<Self>, plan: &BuildPlan, op: &Op, work: &Path) -> Result<ImageBuildResult, ApiError> {
        if let Some(img) = &plan.existing {
            for stage in BUILD_STAGES {
                op.stage(stage);
            }
            if plan.make_default {
                self.store.set_default_image(img.id.clone()).await?;
            }
            let img = self.resolve_image(Some(&img.id)).await?;
            return Ok(ImageBuildResult { image: self.image_info(&img).await, reused: true, rootfs_cached: true });
        }
        tokio::fs::create_dir_all(work).await.map_err(|e| {
            ApiError::internal(format!("creating {}: {e}", work.display()))
                .with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
        let root_dir = work.join("root");

        op.stage("rootfs");
        let mut rootfs_cached = false;
        // The root filesystem to assemble: a recipe's tar, or a folder.
        let mut root: PathBuf = match &plan.from {
            BuildFrom::Recipe { name, dir, key } => {
                let cached = self.cfg.cache_dir.join("rootfs").join(format!("{name}-{key}.tar"));
                if cached.is_file() && !plan.no_cache {
                    rootfs_cached = true;
                    op.detail(&format!("reusing cached root filesystem {}", cached.display()));
                } else {
                    let tmp = work.join("rootfs.tar");
                    let mut cmd = tokio::process::Command::new(dir.join("recipe.sh"));
                    cmd.arg(&tmp).current_dir(dir);
                    run_logged(cmd, op, &format!("recipe {name}")).await?;
                    // Into the cache only once complete, so an interrupted build never leaves a bad entry.
                    store_in_cache(&tmp, &cached).await?;
                }
                cached
            }
            BuildFrom::Image(img) => {
                extract_ext4(Path::new(&img.rootfs), &root_dir, &work.join("mnt"), op).await?;
                root_dir.clone()
            }
        };

        op.stage("customize");
        if let Some(script) = &plan.script {
            if root != root_dir {
                tokio::fs::create_dir_all(&root_dir)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()).with_hint(crate::engine::errors::hint::STATE_DIR))?;
                let mut cmd = tokio::process::Command::new("tar");
                cmd.arg("-C").arg(&root_dir).args(["--numeric-owner", "-xpf"]).arg(&root);
                run_logged(cmd, op, "unpacking the root filesystem").await?;
                root = root_dir.clone();
            }
            let mut cmd = tokio::process::Command::new(script);
            cmd.arg(&root_dir);
            run_logged(cmd, op, &format!("script {}", script.display())).await?;
        }

        op.stage("assemble");
        let out = work.join("rootfs.ext4");
        let stamp = serde_json::json!({
            "name": plan.name,
            "build_id": plan.build_id,
            "source": plan.source,
            "built_at": super::now(),
            "banger": tools_schema::BuildInfo::current().version,
        });
        let mut cmd = tokio::process::Command::new(&plan.assemble);
        cmd.arg(&root)
            .arg(&plan.agent)
            .arg(&out)
            .arg(format!("{}G", plan.size_gib))
            .env("BANGER_IMAGE_STAMP", stamp.to_string());
        run_logged(cmd, op, "assembling the image").await?;

        op.stage("register");
        let sources = ImageSources {
            kernel: plan.kernel.clone(),
            kernel_elf: plan.kernel_elf.clone(),
            initrd: plan.initrd.clone(),
            rootfs: out,
            work_seed: Some(work.join("rootfs.work.ext4")),
            take_disks: true,
        };
        let build = Some((plan.build_id.clone(), plan.source.clone()));
        let row = self.install_image(&plan.name, sources, plan.make_default, build, &op.cancel).await?;
        Ok(ImageBuildResult { image: self.image_info(&row).await, reused: false, rootfs_cached })
    }
}

/// Runs a build step, passing each line it prints to the operation (and the log), killing its whole process
/// group if the operation is cancelled, and failing with the last lines it printed.
async fn run_logged(mut cmd: tokio::process::Command, op: &Op, what: &str) -> Result<(), ApiError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        ApiError::internal(format!("cannot start {what}: {e}"))
            .with_hint("scripts/setup-host.sh installs what image builds run")
            .with_next("doctor.run", serde_json::json!({}), "checks the host's build tools")
    })?;
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let (mut out_open, mut err_open) = (true, true);
    let mut note = |line: String| {
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return;
        }
        tracing::debug!(step = what, "{line}");
        op.detail(&line);
        if tail.len() == 12 {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    let status = loop {
        tokio::select! {
            line = out.next_line(), if out_open => match line {
                Ok(Some(l)) => note(l),
                _ => out_open = false,
            },
            line = err.next_line(), if err_open => match line {
                Ok(Some(l)) => note(l),
                _ => err_open = false,
            },
            status = child.wait(), if !out_open && !err_open => break status,
            _ = op.cancel.cancelled() => {
                if let Some(pgid) = pgid {
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = child.wait().await;
                return Err(ApiError::new(ErrorCode::Cancelled, "image build cancelled; nothing was registered").with_hint("nothing was registered; run the build again to retry"));
            }
        }
    };
    let status = status.map_err(|e| {
        ApiError::internal(format!("waiting for {what}: {e}")).with_hint(crate::engine::errors::hint::DAEMON_LOG)
    })?;
    if status.success() {
        return Ok(());
    }
    let code = status.code().map(|c| format!("exit code {c}")).unwrap_or_else(|| format!("{status}"));
    let last = Vec::from(tail).join("\n  ");
    Err(ApiError::new(ErrorCode::Internal, format!("{what} failed ({code}); its last output:\n  {last}"))
        .with_hint("fix the cause shown above and build again; nothing was registered"))
}

/// Copies an ext4 image's whole tree (ownership, modes, setuid bits, links) into `dest`. The image is mounted
/// read-only inside a private mount namespace, so the mount and its loop device go away with the process even
/// if it is killed: nothing can leak.
async fn extract_ext4(image: &Path, dest: &Path, mnt: &Path, op: &Op) -> Result<(), ApiError> {
    for d in [dest, mnt] {
        tokio::fs::create_dir_all(d).await.map_err(|e| {
            ApiError::internal(format!("creating {}: {e}", d.display()))
                .with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
    }
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-euc"])
        .arg("mount -o loop,ro \"$1\" \"$2\"\ntar -C \"$2\" --numeric-owner -cf - . | tar -C \"$3\" --numeric-owner -xpf -\n")
        .arg("extract")
        .arg(image)
        .arg(mnt)
        .arg(dest);
    run_logged(cmd, op, "copying the base image").await
}

async fn store_in_cache(tmp: &Path, cached: &Path) -> Result<(), ApiError> {
    let parent = cached.parent().expect("cache path has a parent");
    tokio::fs::create_dir_all(parent).await.map_err(|e| {
        ApiError::internal(format!("creating {}: {e}", parent.display()))
            .with_hint("check free space and permissions of the cache directory (cache_dir in the config)")
    })?;
    if tokio::fs::rename(tmp, cached).await.is_err() {
        // The cache may be on another filesystem: copy beside the entry, then rename into place.
        let partial = cached.with_extension("tar.partial");
        let copied = match tokio::fs::copy(tmp, &partial).await {
            Ok(_) => tokio::fs::rename(&partial, cached).await,
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            // Never leave a half-copied entry in the shared cache.
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ApiError::internal(format!("caching the root filesystem in {}: {e}", parent.display()))
                .with_hint("check free space in the daemon's cache_dir"));
        }
    }
    Ok(())
}

/// The recipe's content hash: sha256 over `sha256sum`-style lines for every file of the recipe folder and the
/// shared `lib/` folder beside it, sorted by path, first 16 hex digits. scripts/setup-host.sh computes the same
/// key in shell, so the root tars it prepares are the ones builds find in the cache.
pub fn recipe_key(recipe_dir: &Path) -> std::io::Result<String> {
    let parent = recipe_dir.parent().unwrap_or(Path::new("/"));
    let mut files = Vec::new();
    for top in [recipe_dir.to_path_buf(), parent.join("lib")] {
        if top.is_dir() {
            collect_files(&top, &mut files)?;
        }
    }
    let mut lines: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(parent).unwrap_or(f).to_string_lossy().into_owned();
            Ok((rel, file_sha256(f)?))
        })
        .collect::<std::io::Result<_>>()?;
    lines.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let text: String = lines.iter().map(|(path, hash)| format!("{hash}  {path}\n")).collect();
    Ok(hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            collect_files(&entry.path(), out)?;
        } else if ty.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn list_recipes(recipes: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(recipes)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("recipe.sh").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key must match what scripts/setup-host.sh computes in shell; this pins the format.
    #[test]
    fn recipe_key_hashes_recipe_and_lib_files_like_sha256sum() {
        let tmp = tempfile::tempdir().unwrap();
        let recipe = tmp.path().join("demo");
        std::fs::create_dir_all(&recipe).unwrap();
        std::fs::create_dir_all(tmp.path().join("lib")).unwrap();
        std::fs::write(recipe.join("recipe.sh"), "echo hi\n").unwrap();
        std::fs::write(tmp.path().join("lib/x.sh"), "x\n").unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("find demo lib -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let shell = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(recipe_key(&recipe).unwrap(), shell);
        // Any change to a shared lib file changes the key.
        let before = recipe_key(&recipe).unwrap();
        std::fs::write(tmp.path().join("lib/x.sh"), "y\n").unwrap();
        assert_ne!(recipe_key(&recipe).unwrap(), before);
    }
}
