//! Image operations.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Register an existing kernel + root filesystem as a named image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRegisterParams {
    /// Image name: 1-63 characters, lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
    /// Absolute path of the guest kernel as a bzImage (QEMU boots it directly).
    pub kernel: String,
    /// Absolute path of the uncompressed ELF `vmlinux` of the same kernel (Firecracker needs it).
    #[serde(default)]
    pub kernel_elf: Option<String>,
    /// Absolute path of the initramfs that mounts the root disk.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Absolute path of the ext4 root filesystem image. The daemon copies it into its own store, so the
    /// source may be removed afterwards.
    pub rootfs: String,
    /// Absolute path of the image's work seed: an ext4 filesystem (label `banger-work`) with the initial
    /// contents of /root. Each VM's work disk is a copy-on-write clone of it. An empty 1 GiB seed is made
    /// when omitted.
    #[serde(default)]
    pub work_seed: Option<String>,
    /// Make this the default image for new VMs.
    #[serde(default)]
    pub make_default: bool,
}

/// Refers to one image by name or id.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Image name or id.
    pub image: String,
}

/// A registered image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    /// True for the image new VMs get when they name none.
    pub is_default: bool,
    /// Kernel (bzImage) path, inside the daemon's store.
    pub kernel: String,
    /// ELF kernel path for Firecracker, when the image has one.
    pub kernel_elf: Option<String>,
    pub initrd: Option<String>,
    /// Read-only base root filesystem shared by every VM of this image.
    pub rootfs: String,
    /// Size of the root filesystem in bytes.
    pub rootfs_bytes: u64,
    /// The work seed every VM's /root disk is cloned from.
    pub work_seed: String,
    /// Content fingerprint (sha256 of kernel, initrd and rootfs), so a VM can tell which build it runs.
    pub fingerprint: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
    /// For images made by `image.build`: the id of the build's inputs (recipe or base image, script,
    /// guest agent, assembly). The same id is inside the image at `/etc/banger/image.json`, so a VM can
    /// tell which build it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// What a built image was made from, e.g. `recipe debian-agent` or `image debian-minimal + script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Programs of note its root filesystem has (of bash, git, python3, node, npm, claude, opencode, pi,
    /// tmux, make, gcc, cargo, curl, sshd: `NOTABLE_PROGRAMS`), read from the filesystem itself.
    #[serde(default)]
    pub provides: Vec<String>,
}

/// The programs `ImageInfo::provides` looks for, in the order it lists them.
pub const NOTABLE_PROGRAMS: &[&str] = &[
    "bash", "git", "python3", "node", "npm", "claude", "opencode", "pi", "tmux", "make", "gcc", "cargo", "curl", "sshd",
];

/// All registered images.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// An image was deleted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageDeleted {
    pub id: String,
    pub name: String,
}

/// Largest root filesystem `image.build` makes, in GiB (sparse: only what the image holds uses disk).
pub const MAX_IMAGE_GIB: u32 = 256;

/// Build an image on the host from a recipe or from a registered image, then register it. Nothing runs in a
/// guest and no network is needed inside one: recipes fetch packages with the host's network.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBuildParams {
    /// Name of the new image: 1-63 characters, lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
    /// Recipe to build from: a folder name in the daemon's recipes directory (`debian-minimal`,
    /// `debian-agent`) or the absolute path of a recipe folder (an executable `recipe.sh OUTPUT.tar` that
    /// writes a root filesystem tar, and optionally a `size_gib` file). Exactly one of `recipe` and
    /// `from_image`.
    #[serde(default)]
    pub recipe: Option<String>,
    /// Build on top of this registered image's root filesystem (name or id) instead of a recipe; the
    /// kernel and initramfs are the base image's.
    #[serde(default)]
    pub from_image: Option<String>,
    /// Absolute path of a host script run as `script ROOT_DIR` on the new root filesystem before it is
    /// assembled, e.g. `chroot "$1" apt-get install -y postgresql` or `npm install -g --prefix
    /// "$1/usr/local" some-cli`. Runs on the host with the host's network.
    #[serde(default)]
    pub script: Option<String>,
    /// Size of the root filesystem in GiB (default: the recipe's `size_gib`, else the base image's size,
    /// else 4). Files are sparse, so unused space costs no disk.
    #[serde(default)]
    pub size_gib: Option<u32>,
    /// Make the new image the default for new VMs.
    #[serde(default)]
    pub make_default: bool,
    /// Ignore the cached root filesystem and run the recipe again.
    #[serde(default)]
    pub no_cache: bool,
}

impl ImageBuildParams {
    /// Checks every field that can be checked without daemon state.
    pub fn validate(&self) -> Result<(), String> {
        crate::vm::validate_name("image", &self.name)?;
        match (&self.recipe, &self.from_image) {
            (None, None) => return Err("give a recipe (e.g. `debian-agent`) or a base image to build from".into()),
            (Some(_), Some(_)) => return Err("give either a recipe or a base image, not both".into()),
            _ => {}
        }
        if let Some(r) = &self.recipe {
            let as_name = !r.contains('/');
            if r.is_empty() || (as_name && (r.starts_with('.') || r.contains(char::is_whitespace))) {
                return Err(format!("recipe `{r}` is not a recipe name or an absolute folder path"));
            }
            if !as_name && !r.starts_with('/') {
                return Err(format!("recipe path `{r}` must be absolute"));
            }
        }
        if let Some(s) = &self.script {
            if !s.starts_with('/') {
                return Err(format!("script must be an absolute path, got `{s}`"));
            }
        }
        if let Some(g) = self.size_gib {
            if g == 0 || g > MAX_IMAGE_GIB {
                return Err(format!("size_gib must be between 1 and {MAX_IMAGE_GIB}, got {g}"));
            }
        }
        Ok(())
    }
}

/// A finished image build.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageBuildResult {
    pub image: ImageInfo,
    /// An image with this name and the same build id was already registered: nothing was built.
    pub reused: bool,
    /// The recipe's root filesystem came from the build cache instead of running the recipe.
    pub rootfs_cached: bool,
}

/// Prepares the warm-start template of an image for one VM shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageWarmParams {
    /// Image name or id. The default image when omitted.
    #[serde(default)]
    pub image: Option<String>,
    /// Shape of the VMs the template serves (the daemon's defaults when omitted): a VM is restored from a
    /// template only when its vcpus and memory match.
    #[serde(default)]
    #[schemars(range(min = crate::vm::MIN_VCPUS, max = crate::vm::MAX_VCPUS))]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB of those VMs.
    #[serde(default)]
    #[schemars(range(min = crate::vm::MIN_MEMORY_MIB, max = crate::vm::MAX_MEMORY_MIB))]
    pub memory_mib: Option<u32>,
    /// Build a new template even if a current one exists.
    #[serde(default)]
    pub rebuild: Option<bool>,
}

impl ImageWarmParams {
    pub fn validate(&self) -> Result<(), String> {
        crate::vm::VmCreateParams { vcpus: self.vcpus, memory_mib: self.memory_mib, ..Default::default() }.validate()
    }
}

/// A warm-start template: a booted guest saved once its agent was ready, restored by every new VM of the
/// same image and shape.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TemplateInfo {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Id of this template build; a new one replaces it when the image, kernel or banger changes.
    pub generation: String,
    /// When it was made, seconds since the Unix epoch.
    pub created_at: i64,
    /// True when an up-to-date template already existed and nothing was built.
    pub reused: bool,
    /// Milliseconds the build took (boot to ready, then save), when one was built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Why the previous template (if any) could not be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_because: Option<String>,
}
