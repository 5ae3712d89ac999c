//! The live guest connection of each running VM, and the one shared connect when it is missing.
use std::collections::HashMap;

use parking_lot::Mutex;

use super::*;

/// How long callers wait for the one connect to a running VM's channel (retried within it).
pub(super) const GUEST_CONNECT_WAIT: Duration = Duration::from_secs(20);

/// A guest connect in progress, which every caller waiting for the VM's connection awaits.
type PendingConnect = Shared<BoxFuture<'static, Result<Arc<GuestConn>, ApiError>>>;

/// The guest connections of running VMs: at most one live connection and at most one connect under way per VM.
#[derive(Default)]
pub(crate) struct Guests {
    live: Mutex<HashMap<String, Arc<GuestConn>>>,
    /// The connect in progress per VM, shared by every caller that finds no live connection meanwhile: they
    /// all get its one result, success or failure, when it ends.
    connecting: Mutex<HashMap<String, PendingConnect>>,
}

impl Guests {
    /// The VM's connection, unless it has none or it broke.
    pub(crate) fn live(&self, id: &str) -> Option<Arc<GuestConn>> {
        self.live.lock().get(id).filter(|c| !c.is_closed()).cloned()
    }

    /// The VM's connection as last adopted, broken or not (a halt still tries it).
    pub(crate) fn last(&self, id: &str) -> Option<Arc<GuestConn>> {
        self.live.lock().get(id).cloned()
    }

    /// `conn` is the VM's connection from now on (a boot made it).
    pub(crate) fn adopt(&self, id: &str, conn: Arc<GuestConn>) {
        self.live.lock().insert(id.to_string(), conn);
    }

    /// Closes and forgets the VM's connection (it stopped).
    pub(crate) fn close(&self, id: &str) {
        if let Some(c) = self.live.lock().remove(id) {
            c.close();
        }
    }

    /// The VM's live connection, or the result of the one connect every caller without one shares: `start`
    /// makes that connect when none is under way (or refuses, e.g. when the VMM is gone). A guest that does
    /// not answer costs all waiters one wait, not one each in turn; the next caller after a failure starts
    /// afresh.
    pub(crate) async fn connect(
        &self,
        id: &str,
        start: impl FnOnce() -> Result<BoxFuture<'static, Result<Arc<GuestConn>, ApiError>>, ApiError>,
    ) -> Result<Arc<GuestConn>, ApiError> {
        if let Some(c) = self.live(id) {
            return Ok(c);
        }
        let attempt = {
            let mut pending = self.connecting.lock();
            // Checked under the lock: a connect that just ended adopted its connection before it left.
            if let Some(c) = self.live(id) {
                return Ok(c);
            }
            match pending.get(id) {
                Some(attempt) => attempt.clone(),
                None => {
                    let attempt = start()?.shared();
                    pending.insert(id.to_string(), attempt.clone());
                    attempt
                }
            }
        };
        let result = attempt.clone().await;
        if let Ok(conn) = &result {
            self.adopt(id, conn.clone());
        }
        let mut pending = self.connecting.lock();
        if pending.get(id).is_some_and(|p| p.ptr_eq(&attempt)) {
            pending.remove(id);
        }
        result
    }
}

impl Engine {
    /// The live guest connection of a running VM, reconnecting if the old one broke.
    pub(crate) async fn guest(&self, row: &VmRow) -> Result<Arc<GuestConn>, ApiError> {
        if row.state != VmState::Running {
            return Err(ApiError::precondition(format!("VM {} is {}", row.name, row.state.as_str()))
                .with_hint("the VM must be running")
                .with_next("vm.start", serde_json::json!({"vm": row.name}), "starts it"));
        }
        // One connect per VM, shared (after a daemon restart a burst of calls finds no connection; a QEMU
        // channel socket serves one client, so parallel connects would fail with EAGAIN or wait behind each
        // other). Transient failures are retried inside `ready`.
        self.guests
            .connect(&row.id, || {
                if !self.is_alive(row) {
                    return Err(ApiError::new(
                        ErrorCode::GuestUnreachable,
                        format!("VM {}'s VMM is not running", row.name),
                    )
                    .with_hint("the VM stopped without the daemon stopping it")
                    .with_next("vm.logs", serde_json::json!({"vm": row.name}), "shows the guest console")
                    .with_next("vm.start", serde_json::json!({"vm": row.name}), "starts it again"));
                }
                let (channel, name) = (self.vm_paths(&row.id).guest_channel(), row.name.clone());
                Ok(async move {
                    let deadline = tokio::time::Instant::now() + GUEST_CONNECT_WAIT;
                    let ready = channel.ready(deadline, &CancellationToken::new()).await;
                    ready.map(|(conn, _)| conn).map_err(|e| guest_error(&name, e))
                }
                .boxed())
            })
            .await
    }
}
