//! `banger image ...`: build, register, list, show, promote, warm, delete.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tools_schema::image::{ImageBuildParams, ImageInfo, ImageRef, ImageRegisterParams, ImageWarmParams};
use tools_schema::ops;

use crate::{absolute, output, Ctx};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an image on the host from a recipe, or from a registered image plus a script, and register it.
    #[command(after_help = "Examples:\n  banger image build agent --recipe debian-agent --default\n  \
banger image build pg --from agent --script ./add-postgres.sh\n\nRecipes live in the daemon's recipes folder \
(banger's images/): debian-minimal, debian-agent (node, claude, opencode, pi, tmux, build tools).\nA script \
runs on the host as `script ROOT_DIR`, e.g. `chroot \"$1\" apt-get install -y postgresql`.\nBuilding the \
same inputs again under the same name reuses the image; the recipe's root filesystem is cached.\nCtrl-C \
cancels and removes everything the build made.")]
    Build(BuildArgs),
    /// Register an existing kernel, initramfs and ext4 root filesystem as an image.
    #[command(
        after_help = "Example:\n  banger image register --name debian --kernel /path/vmlinuz --initrd /path/initrd --rootfs /path/root.ext4 --default"
    )]
    Register(RegisterArgs),
    /// List images.
    #[command(after_help = "Example:\n  banger image list --json")]
    List,
    /// Show one image: files, size, fingerprint, build id and source.
    #[command(after_help = "Example:\n  banger image show debian-agent")]
    Show { image: String },
    /// Make an image the default for new VMs.
    #[command(after_help = "Example:\n  banger image promote debian-agent")]
    Promote { image: String },
    /// Make the image's warm-start template for a VM shape now (vm create otherwise makes it in the background
    /// after the first cold boot). New VMs of that image and shape are then restored from it instead of booted.
    #[command(after_help = "Example:\n  banger image warm agent --vcpus 2 --memory 2048")]
    Warm {
        /// Image name or id (default image when omitted).
        image: Option<String>,
        /// The shape of the VMs it serves.
        #[command(flatten)]
        shape: crate::args::ShapeArgs,
        /// Build a new template even if the current one is up to date.
        #[arg(long)]
        rebuild: bool,
    },
    /// Delete an image (refused while VMs use it).
    #[command(after_help = "Example:\n  banger image delete old-image")]
    Delete { image: String },
}

#[derive(Args)]
pub struct BuildArgs {
    /// Name of the new image.
    name: String,
    /// Recipe name (a folder in the recipes directory) or path of a recipe folder.
    #[arg(long, conflicts_with = "from", required_unless_present = "from")]
    recipe: Option<String>,
    /// Registered image to build on.
    #[arg(long)]
    from: Option<String>,
    /// Host script run as `script ROOT_DIR` before assembly.
    #[arg(long)]
    script: Option<PathBuf>,
    /// Root filesystem size in GiB.
    #[arg(long)]
    size_gib: Option<u32>,
    /// Make it the default image.
    #[arg(long)]
    default: bool,
    /// Run the recipe again even when its root filesystem is cached.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args)]
pub struct RegisterArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    kernel_elf: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    rootfs: PathBuf,
    /// ext4 with the initial /root (label banger-work); an empty one is made when omitted.
    #[arg(long)]
    work_seed: Option<PathBuf>,
    /// Make it the default image.
    #[arg(long)]
    default: bool,
}

pub async fn run(cmd: ImageCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = ctx.daemon().await?;
    match cmd {
        ImageCmd::Build(a) => {
            // A recipe given as a path (it contains a `/`) is made absolute for the daemon.
            let recipe = a.recipe.map(|r| if r.contains('/') { absolute(PathBuf::from(r)) } else { r });
            let p = ImageBuildParams {
                name: a.name,
                recipe,
                from_image: a.from,
                script: a.script.map(absolute),
                size_gib: a.size_gib,
                make_default: a.default,
                no_cache: a.no_cache,
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            let op = d.call::<ops::ImageBuildBegin>(&p).await?;
            let done = crate::operation_cmd::follow(&d, op, !ctx.json).await?;
            match (done.image_build, done.error) {
                (Some(b), _) => {
                    if ctx.json {
                        output::json(&b);
                    } else if b.reused {
                        println!("image {} is up to date (build {}): nothing to do", b.image.name, build_id(&b.image));
                    } else {
                        println!(
                            "built image {} in {:.1}s (build {}{}){}",
                            b.image.name,
                            done.elapsed_ms as f64 / 1000.0,
                            build_id(&b.image),
                            if b.rootfs_cached { ", cached root filesystem" } else { "" },
                            if b.image.is_default { ", default" } else { "" }
                        );
                        println!("  boot it: banger vm create --image {}", b.image.name);
                    }
                }
                (None, Some(e)) => return Err(crate::client::CallError::Api(e).into()),
                (None, None) => anyhow::bail!("the build ended without a result"),
            }
        }
        ImageCmd::Register(a) => {
            let p = ImageRegisterParams {
                name: a.name,
                kernel: absolute(a.kernel),
                kernel_elf: a.kernel_elf.map(absolute),
                initrd: a.initrd.map(absolute),
                rootfs: absolute(a.rootfs),
                work_seed: a.work_seed.map(absolute),
                make_default: a.default,
            };
            let img = d.call::<ops::ImageRegister>(&p).await?;
            if ctx.json {
                output::json(&img)
            } else {
                println!(
                    "registered image {} ({}){}",
                    img.name,
                    img.fingerprint,
                    if img.is_default { ", default" } else { "" }
                )
            }
        }
        ImageCmd::List => {
            let list = d.call::<ops::ImageList>(&Default::default()).await?;
            if ctx.json {
                output::json(&list);
            } else {
                let rows = list
                    .images
                    .iter()
                    .map(|i| {
                        vec![
                            format!("{}{}", i.name, if i.is_default { " *" } else { "" }),
                            i.id.clone(),
                            format!("{} MiB", i.rootfs_bytes >> 20),
                            i.source.clone().unwrap_or_else(|| "registered".into()),
                            i.fingerprint.clone(),
                            output::ago(i.created_at),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["NAME", "ID", "ROOTFS", "SOURCE", "FINGERPRINT", "CREATED"], &rows);
            }
        }
        ImageCmd::Show { image } => output::json(&d.call::<ops::ImageShow>(&ImageRef { image }).await?),
        ImageCmd::Promote { image } => {
            let img = d.call::<ops::ImagePromote>(&ImageRef { image }).await?;
            if ctx.json {
                output::json(&img)
            } else {
                println!("{} is now the default image", img.name)
            }
        }
        ImageCmd::Warm { image, shape, rebuild } => {
            let p = ImageWarmParams {
                image,
                vcpus: shape.vcpus,
                memory_mib: shape.memory_mib,
                rebuild: rebuild.then_some(true),
            };
            p.validate().map_err(|e| anyhow::anyhow!(e))?;
            if !ctx.json {
                eprintln!("preparing the warm-start template (boots the image once if needed)...");
            }
            let t = d.call::<ops::ImageWarm>(&p).await?;
            if ctx.json {
                output::json(&t)
            } else if t.reused {
                println!(
                    "template {} of {} ({} vCPU, {} MiB) is up to date",
                    t.generation, t.image, t.vcpus, t.memory_mib
                );
            } else {
                println!(
                    "template {} of {} ({} vCPU, {} MiB) built in {:.1} s{}",
                    t.generation,
                    t.image,
                    t.vcpus,
                    t.memory_mib,
                    t.build_ms.unwrap_or(0) as f64 / 1000.0,
                    t.replaced_because
                        .map(|r| format!("; it replaces one that could not be used: {r}"))
                        .unwrap_or_default()
                );
            }
        }
        ImageCmd::Delete { image } => {
            let r = d.call::<ops::ImageDelete>(&ImageRef { image }).await?;
            if ctx.json {
                output::json(&r)
            } else {
                println!("deleted image {}", r.name)
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn build_id(img: &ImageInfo) -> &str {
    img.build_id.as_deref().unwrap_or("-")
}
