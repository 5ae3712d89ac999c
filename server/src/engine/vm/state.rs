//! What the daemon keeps in memory about each VM beyond its store row: its lock, how it last booted, and
//! what its exec spool may still take. Forgotten when the VM is deleted (its lock is kept: `KeyedLocks`).
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;
use tools_schema::vm::BootInfo;

use crate::engine::locks::KeyedLocks;

#[derive(Default)]
pub(crate) struct Vms {
    /// Operations on one VM are serialised, different VMs proceed in parallel.
    locks: KeyedLocks,
    /// How each VM was last brought up by this daemon.
    boots: Mutex<HashMap<String, BootInfo>>,
    /// Bytes each VM's exec spool folder may still take (`exec.rs`).
    spool_budgets: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Vms {
    pub(crate) fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(id)
    }

    pub(crate) fn booted(&self, id: &str, boot: BootInfo) {
        self.boots.lock().insert(id.to_string(), boot);
    }

    pub(crate) fn last_boot(&self, id: &str) -> Option<BootInfo> {
        self.boots.lock().get(id).cloned()
    }

    pub(crate) fn spool_budget(&self, id: &str) -> Option<Arc<AtomicU64>> {
        self.spool_budgets.lock().get(id).cloned()
    }

    /// The budget already kept for `id`, else `fresh`: the first measurement wins a race.
    pub(crate) fn keep_spool_budget(&self, id: &str, fresh: Arc<AtomicU64>) -> Arc<AtomicU64> {
        self.spool_budgets.lock().entry(id.to_string()).or_insert(fresh).clone()
    }

    /// The VM is gone: its boot record and spool budget go too.
    pub(crate) fn forget(&self, id: &str) {
        self.boots.lock().remove(id);
        self.spool_budgets.lock().remove(id);
    }
}
