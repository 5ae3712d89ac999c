//! A VM's folder and its own copies of read-only disks: used by creates (`vm/`) and by the warm pool and
//! templates (`warm/`), so it belongs to neither.
use tools_schema::ApiError;

use super::errors::vmm_error;
use crate::vmm;

/// Creates a VM's directory, which must be new: a directory of that id that exists already belongs to
/// another VM (or a pooled one), and sharing it would mix their disks and sockets.
pub(crate) async fn create_vm_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|e| {
            ApiError::internal(format!("creating {}: {e}", parent.display()))
                .with_hint(crate::engine::errors::hint::STATE_DIR)
        })?;
    }
    tokio::fs::create_dir(dir).await.map_err(|e| {
        ApiError::internal(format!("creating {}: {e}", dir.display()))
            .with_hint("a directory of that id exists already; the daemon log says which VM holds it")
    })
}

/// A VM's own sparse copy (reflinked where the filesystem can) of a read-only disk: an image's work seed or a
/// template's disks.
pub(crate) async fn copy_writable(from: &std::path::Path, to: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    vmm::copy_sparse(from, to).await.map_err(vmm_error)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(crate::host_files::PRIVATE_FILE)).map_err(|e| {
        ApiError::internal(format!("making {} writable: {e}", to.display()))
            .with_hint(crate::engine::errors::hint::STATE_DIR)
    })
}
