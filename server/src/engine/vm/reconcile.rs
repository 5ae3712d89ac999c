//! At daemon start: the store made to agree with the VMM processes that are really running.
use super::*;

impl Engine {
    /// Brings the store in line with reality after a daemon (re)start: running VMs whose VMM is still
    /// alive are adopted; dead ones are marked stopped; a create that never finished is rolled back.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), ApiError> {
        let rows = self.store.vms().await?;
        for row in &rows {
            // The store may not have the pid yet if the daemon died right after launching the VMM; the
            // VMM's own pid file does.
            let pid = row.pid.or_else(|| self.pid_from_pidfile(&row.id));
            let marker = vmm::process_marker(&row.id);
            let alive = pid.is_some_and(|p| crate::host::process_matches(p, &marker));
            match row.state {
                VmState::Starting if row.started_at.is_none() => {
                    tracing::warn!(vm = %row.name, "rolling back a create interrupted by a daemon restart");
                    if let Some(pid) = pid {
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                    let _ = tokio::fs::remove_dir_all(self.vm_paths(&row.id).dir).await;
                    self.store.delete_vm(row.id.clone()).await?;
                }
                VmState::Running if alive => {
                    tracing::info!(vm = %row.name, pid = ?pid, "re-adopted running VM")
                }
                VmState::Running | VmState::Starting | VmState::Stopping => {
                    if let Some(pid) = pid.filter(|_| alive) {
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                    tracing::info!(vm = %row.name, "VM was not running after daemon restart; marked stopped");
                    self.store.set_vm_state(row.id.clone(), VmState::Stopped, None, None, None).await?;
                    // Network set-up, which runs next, reclaims TAPs no running VM holds.
                    self.store.set_vm_tap(row.id.clone(), None).await?;
                }
                VmState::Stopped | VmState::Failed => {
                    if let Some(pid) = pid.filter(|_| alive) {
                        tracing::warn!(vm = %row.name, pid, "killing a VMM that outlived its stopped VM");
                        vmm::stop_vm_processes(&self.vm_paths(&row.id).dir, &row.id, Some(pid)).await;
                    }
                }
            }
            if !alive {
                // A VMM killed while no daemon watched leaves its jail's folder and its cgroup behind.
                vmm::remove_containment(&row.id).await;
            }
        }
        // Directories with no record are leftovers of a create or delete that died half-way.
        let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.vms_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().to_string();
                if known.contains(id.as_str()) {
                    continue;
                }
                // (Warm-pool VMs have no record either: the pool lives in the daemon's memory.)
                tracing::warn!(id = %id, "removing an orphaned VM directory");
                vmm::stop_vm_processes(&e.path(), &id, self.pid_from_pidfile(&id)).await;
                let _ = tokio::fs::remove_dir_all(e.path()).await;
            }
        }
        self.collect_templates().await;
        Ok(())
    }

    pub(super) fn pid_from_pidfile(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.vm_paths(id).pidfile()).ok()?.trim().parse().ok()
    }
}
