//! The live guest connection of each running VM, and the one shared connect when it is missing.
use super::*;

/// How long callers wait for the one connect to a running VM's channel (retried within it).
pub(super) const GUEST_CONNECT_WAIT: Duration = Duration::from_secs(20);

/// A guest connect in progress, which every caller waiting for the VM's connection awaits.
pub(crate) type PendingConnect = Shared<BoxFuture<'static, Result<Arc<GuestConn>, ApiError>>>;

impl Engine {
    pub(super) fn drop_guest(&self, id: &str) {
        if let Some(c) = self.guests.lock().remove(id) {
            c.close();
        }
    }

    /// The live guest connection of a running VM, reconnecting if the old one broke.
    pub(crate) async fn guest(&self, row: &VmRow) -> Result<Arc<GuestConn>, ApiError> {
        if row.state != VmState::Running {
            return Err(ApiError::precondition(format!("VM {} is {}", row.name, row.state.as_str()))
                .with_hint(format!("start it first: banger vm start {}", row.name)));
        }
        let live = || self.guests.lock().get(&row.id).filter(|c| !c.is_closed()).cloned();
        if let Some(c) = live() {
            return Ok(c);
        }
        // One connect per VM, shared by every caller that arrives meanwhile (after a daemon restart a burst
        // of calls finds no connection; a QEMU channel socket serves one client, so parallel connects would
        // fail with EAGAIN or wait behind each other). They all get its result when it ends: a guest that
        // does not answer costs them one wait, not one each in turn. Transient failures are retried inside
        // `ready`.
        let attempt = {
            let mut pending = self.guest_connects.lock();
            // Checked under the lock: a connect that just ended put its connection in `guests` before it left.
            if let Some(c) = live() {
                return Ok(c);
            }
            match pending.get(&row.id) {
                Some(attempt) => attempt.clone(),
                None => {
                    if !self.is_alive(row) {
                        return Err(ApiError::new(
                            ErrorCode::GuestUnreachable,
                            format!("VM {}'s VMM is not running", row.name),
                        )
                        .with_hint(format!("banger vm start {}", row.name)));
                    }
                    let (channel, name) = (self.vm_paths(&row.id).guest_channel(), row.name.clone());
                    let attempt = async move {
                        let deadline = tokio::time::Instant::now() + GUEST_CONNECT_WAIT;
                        let ready = channel.ready(deadline, &CancellationToken::new()).await;
                        ready.map(|(conn, _)| conn).map_err(|e| guest_error(&name, e))
                    }
                    .boxed()
                    .shared();
                    pending.insert(row.id.clone(), attempt.clone());
                    attempt
                }
            }
        };
        let result = attempt.clone().await;
        if let Ok(conn) = &result {
            self.guests.lock().insert(row.id.clone(), conn.clone());
        }
        // This attempt is over: the next caller without a live connection starts a new one.
        let mut pending = self.guest_connects.lock();
        if pending.get(&row.id).is_some_and(|p| p.ptr_eq(&attempt)) {
            pending.remove(&row.id);
        }
        result
    }
}
