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
}

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
