//! One async lock per key (a VM's id, a template slot): work on one key is serialised, different keys proceed
//! in parallel.
use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Async locks by key. Entries are never removed, so two callers can never hold different locks for the
/// same key (a removed entry could be re-made while its old lock is still held).
#[derive(Default)]
pub(crate) struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// The lock of `key`; `.lock().await` it.
    pub(crate) fn of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(key.to_string()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_is_serialised_and_other_keys_are_not() {
        let locks = KeyedLocks::default();
        let a = locks.of("a");
        let held = a.lock().await;
        assert!(locks.of("a").try_lock().is_err(), "the same key gives the same, held, lock");
        assert!(locks.of("b").try_lock().is_ok(), "another key is free");
        drop(held);
        assert!(locks.of("a").try_lock().is_ok());
    }
}
