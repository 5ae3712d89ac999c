//! Warm starts: per-image template snapshots, clones restored from them, and the warm pool (QEMU).
//!
//! A template is one guest of an image and shape (vcpus, memory), booted once with `banger.template=1`
//! (no SSH, no network settings), saved as soon as its agent answers: guest RAM in a file the template
//! keeps (`ram`, written through a shared mapping), the device state (`state`, tens of KiB, `x-ignore-shared`
//! leaves RAM out), and its two qcow2 disks, frozen from then on. A clone is a new QEMU with the template's
//! exact device set, its RAM file mapped copy-on-write, `-incoming defer`, and disks that are qcow2 overlays
//! over the template's. Once resumed, the agent gets `Reidentify` (clock, RNG reseed, hostname, MAC and
//! address, SSH host key) before the VM is handed out.
//!
//! A template is valid only for the exact inputs it was made from (`TemplateInputs`): image files, kernel,
//! initramfs, QEMU binary, acceleration, banger build, shape. Anything else is refused with the reason, the VM
//! boots cold, and a new template is built. Old generations stay on disk while a VM's disks are overlays of
//! them (a clone cold-boots from them after a stop), and are removed after that.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::VmmKind;
use tools_schema::guest::{CloneIdentity, GuestNetConfig, GuestRequest, GuestResponse};
use tools_schema::image::{ImageWarmParams, TemplateInfo};
use tools_schema::{ApiError, BuildInfo, ErrorCode};

use super::errors::{guest_error, vmm_error};
use super::{new_id, now, CallContext, Engine};
use crate::guest::GuestConn;
use crate::store::{ImageRow, VmRow};
use crate::vmm::{self, BootSpec, GuestMemory, VmPaths};

mod pool;
mod template;

/// Bumped whenever what a template holds or how it is restored changes: older templates are then stale.
const TEMPLATE_FORMAT: u32 = 1;
/// Why there is no template to restore a VM from (`find_template`). Callers decide by the variant, never by
/// the text, which is for people (a cold boot's `cold_reason`, an error message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateMiss {
    /// Warm starts are off, or this VMM cannot make templates here (`warm_unsupported`).
    #[error("{0}")]
    Unsupported(String),
    /// What the template would be made from cannot be read (the VMM binary, an image file).
    #[error("{0}")]
    Inputs(String),
    /// None was made for this image and shape yet.
    #[error("no template for this image and shape yet")]
    Missing,
    #[error("the template's metadata is unreadable")]
    Unreadable,
    /// Made from other inputs than today's: the reason names the first that differs.
    #[error("the template is stale: {0}")]
    Stale(String),
    /// A restore from it failed (the marker's first 300 characters): not tried again until an input changes
    /// or a rebuild is asked for.
    #[error(
        "the template is marked failed: restoring it failed ({0}); it is tried again when the image, kernel, VMM \
         or banger changes, or when the image is warmed again with rebuild"
    )]
    Failed(String),
    #[error("the template's files are incomplete")]
    Incomplete,
}

/// A file as a template saw it: replacing or touching it makes templates made from it stale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileStamp {
    path: String,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> Result<FileStamp, String> {
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::MetadataExt;
        Ok(FileStamp {
            path: path.display().to_string(),
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

/// Everything a template depends on. A template is restored only when all of it is unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TemplateInputs {
    format: u32,
    banger: String,
    image_id: String,
    image_fingerprint: String,
    rootfs: FileStamp,
    work_seed: Option<FileStamp>,
    kernel: FileStamp,
    initrd: Option<FileStamp>,
    /// `qemu` or `firecracker`, and its binary.
    vmm: String,
    vmm_binary: FileStamp,
    accel: tools_schema::daemon::QemuAccel,
    vcpus: u32,
    memory_mib: u32,
    nic: bool,
}

impl TemplateInputs {
    /// Why a template made from `self` cannot serve `now`, or None when it can.
    fn stale_reason(&self, now: &TemplateInputs) -> Option<String> {
        Some(if self.format != now.format {
            "the template format changed".into()
        } else if self.banger != now.banger {
            format!("banger's version changed ({} -> {})", self.banger, now.banger)
        } else if self.image_id != now.image_id
            || self.image_fingerprint != now.image_fingerprint
            || self.rootfs != now.rootfs
            || self.work_seed != now.work_seed
        {
            "the image changed".into()
        } else if self.kernel != now.kernel || self.initrd != now.initrd {
            "the image's kernel changed".into()
        } else if self.vmm != now.vmm || self.vmm_binary != now.vmm_binary || self.accel != now.accel {
            format!("the VMM changed ({})", now.vmm)
        } else if (self.vcpus, self.memory_mib, self.nic) != (now.vcpus, now.memory_mib, now.nic) {
            "the template has another shape".into()
        } else {
            return None;
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TemplateMeta {
    inputs: TemplateInputs,
    generation: String,
    created_at: i64,
    build_ms: u64,
}

/// A usable template generation.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    dir: PathBuf,
    meta: TemplateMeta,
}

impl Template {
    fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub(crate) fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    pub(crate) fn work_disk(&self) -> PathBuf {
        self.dir.join("work.qcow2")
    }
    pub(crate) fn generation(&self) -> &str {
        &self.meta.generation
    }
    /// Where a failed restore is recorded, with its reason: a template generation is keyed by its inputs, so
    /// a marked one is never restored or rebuilt again; a change of inputs makes a new generation.
    fn failed_marker(&self) -> PathBuf {
        self.dir.join("restore-failed")
    }
    fn mark_failed(&self, why: &str) {
        tracing::warn!(template = %self.meta.generation, error = %why, "template restore failed; marked failed");
        let _ = crate::vmm::host_files::write_fresh(&self.failed_marker(), why.as_bytes());
    }
    /// The VMM the template was made on (written by `template_inputs`; anything unknown is QEMU's, as before
    /// the field named Firecracker).
    fn vmm(&self) -> VmmKind {
        self.meta.inputs.vmm.parse().unwrap_or(VmmKind::Qemu)
    }
    fn snapshot(&self, anchor: Option<PathBuf>) -> vmm::Snapshot {
        vmm::Snapshot { state: self.state(), ram: self.ram(), anchor }
    }
}

/// A restored VM waiting in the warm pool: its VMM runs, its channel is connected, it has the template's
/// identity until it is handed out. Its directory is already `<vms>/<id>`, with no record: a daemon that
/// dies removes it like any orphan.
pub(crate) struct PoolEntry {
    pub(crate) id: String,
    pub(crate) image_id: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) pid: u32,
    pub(crate) tap: Option<String>,
    pub(crate) conn: Arc<GuestConn>,
}

/// Warm-start state kept by the engine.
#[derive(Default)]
pub(crate) struct Warm {
    /// One build at a time per template slot.
    slot_locks: crate::engine::locks::KeyedLocks,
    pub(crate) pool: pool::Pool,
}

/// Where a VM's boot comes from.
pub(crate) enum BootPlan {
    Cold { reason: Option<String> },
    Warm(Box<Template>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> TemplateInputs {
        let f = |p: &str| FileStamp { path: p.into(), size: 1, mtime_ns: 1 };
        TemplateInputs {
            format: TEMPLATE_FORMAT,
            banger: "0.1.0+abc".into(),
            image_id: "img".into(),
            image_fingerprint: "fp".into(),
            rootfs: f("/r"),
            work_seed: Some(f("/w")),
            kernel: f("/k"),
            initrd: None,
            vmm: "qemu".into(),
            vmm_binary: f("/q"),
            accel: tools_schema::daemon::QemuAccel::Tcg,
            vcpus: 1,
            memory_mib: 256,
            nic: true,
        }
    }

    #[test]
    fn every_input_change_makes_a_template_stale_with_a_reason() {
        let base = inputs();
        assert_eq!(base.stale_reason(&base), None);
        type Change = Box<dyn Fn(&mut TemplateInputs)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.banger = "0.1.0+def".into()), "banger's version changed"),
            (Box::new(|i| i.kernel.mtime_ns = 2), "kernel changed"),
            (Box::new(|i| i.initrd = Some(FileStamp { path: "/i".into(), size: 1, mtime_ns: 1 })), "kernel changed"),
            (Box::new(|i| i.rootfs.size = 2), "image changed"),
            (Box::new(|i| i.image_fingerprint = "other".into()), "image changed"),
            (Box::new(|i| i.vmm_binary.size = 9), "VMM changed"),
            (Box::new(|i| i.vmm = "firecracker".into()), "VMM changed"),
            (Box::new(|i| i.memory_mib = 512), "another shape"),
            (Box::new(|i| i.format += 1), "format changed"),
        ];
        for (change, want) in cases {
            let mut now = base.clone();
            change(&mut now);
            let why = base.stale_reason(&now).expect("stale");
            assert!(why.contains(want), "{why} should mention {want}");
        }
    }
}
