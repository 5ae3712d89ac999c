//! Admission control: what the host can take, what the daemon's VMs are promised, and boots one slot at a
//! time.
//!
//! Memory. Every VM that is running, starting or being created, every pooled VM and every pool refill in
//! flight is promised its memory. A create, start or refill that would take the promised total past the
//! budget (`limits.memory_overcommit_ratio` × MemTotal, or `limits.memory_mib` when lower) is refused
//! before anything is made, with the numbers. The check and the record that makes the promise happen
//! under the engine's allocation lock (`Admission::allocating`), so two creates cannot both fit into the
//! same last slot.
//!
//! Slots. Boots (cold, template restore, pool refill, start) contend for the host's few cores; beyond
//! `limits.max_concurrent_creates` they wait in a FIFO queue (`CreateSlots`), told how many are ahead.
//! Waiting honours cancellation and holds nothing but the record (which the caller's rollback removes).
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::LimitsStatus;
use tools_schema::vm::VmState;
use tools_schema::{ApiError, ErrorCode};

use crate::config::LimitsConfig;
use crate::store::VmRow;

/// Admission's state: the allocation lock and the boot slots.
pub(crate) struct Admission {
    /// Serialises allocation of everything a new or starting VM takes from the host: name, address, MAC, and
    /// its memory promise; the store's unique indexes are the backstop.
    allocation: tokio::sync::Mutex<()>,
    /// Boots (`limits.max_concurrent_creates`), first come, first served.
    pub(crate) slots: CreateSlots,
}

impl Admission {
    pub(crate) fn new(limits: &LimitsConfig) -> Admission {
        Admission {
            allocation: tokio::sync::Mutex::new(()),
            slots: CreateSlots::new(max_concurrent(limits, &HostCapacity::read())),
        }
    }

    /// Held while a VM's name, address, MAC and memory promise are chosen and recorded.
    pub(crate) async fn allocating(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.allocation.lock().await
    }
}

/// The host's memory and CPUs, read now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostCapacity {
    pub total_mib: u64,
    pub available_mib: u64,
    pub cpus: u32,
}

impl HostCapacity {
    /// Reads /proc/meminfo (through `procfs`); a host that hides it reports no memory, so nothing is admitted.
    pub(crate) fn read() -> HostCapacity {
        use procfs::Current;
        let mem = procfs::Meminfo::current().ok();
        let mib = |bytes: u64| bytes >> 20;
        HostCapacity {
            total_mib: mem.as_ref().map_or(0, |m| mib(m.mem_total)),
            available_mib: mem.as_ref().and_then(|m| m.mem_available).map_or(0, mib),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        }
    }
}

/// The memory VMs together may be promised, MiB.
pub(crate) fn memory_budget_mib(limits: &LimitsConfig, host: &HostCapacity) -> u64 {
    let by_ratio = (host.total_mib as f64 * limits.memory_overcommit_ratio) as u64;
    limits.memory_mib.map_or(by_ratio, |cap| cap.min(by_ratio))
}

/// Boots that may run at once.
pub(crate) fn max_concurrent(limits: &LimitsConfig, host: &HostCapacity) -> usize {
    match limits.max_concurrent_creates {
        0 => host.cpus.max(2) as usize,
        n => n as usize,
    }
}

/// Memory the recorded VMs hold a promise of: all but those stopped or failed (their VMM is gone).
pub(crate) fn recorded_promise_mib(rows: &[VmRow]) -> u64 {
    rows.iter().filter(|r| !matches!(r.state, VmState::Stopped | VmState::Failed)).map(|r| r.memory_mib as u64).sum()
}

/// Refuses `adds_mib` more when the promised total would pass the budget. `what` says what was asked.
pub(crate) fn admit(what: &str, adds_mib: u64, promised_mib: u64, budget_mib: u64) -> Result<(), ApiError> {
    if promised_mib + adds_mib <= budget_mib {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::ResourceExhausted,
        format!(
            "{what} needs {adds_mib} MiB, but VMs are promised {promised_mib} MiB of the {budget_mib} MiB this \
             host may give them ({} MiB free); nothing was made",
            budget_mib.saturating_sub(promised_mib)
        ),
    )
    .with_hint(
        "stop or delete VMs you no longer need, ask for less memory, or raise [limits] memory_overcommit_ratio / \
         memory_mib in the daemon's config",
    )
    .with_next("vm.list", serde_json::json!({}), "shows the VMs and their memory")
    .with_next("daemon.status", serde_json::json!({}), "shows the memory numbers"))
}

/// Boot slots, handed out first come, first served.
pub(crate) struct CreateSlots {
    max: usize,
    semaphore: Arc<Semaphore>,
    /// Tickets of the callers waiting, in arrival order.
    waiting: Mutex<BTreeSet<u64>>,
    next_ticket: AtomicU64,
    /// Bumped whenever someone leaves the queue, so waiters can tell their place.
    moved: watch::Sender<u64>,
}

/// A held boot slot; dropping it lets the next in line go.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl CreateSlots {
    pub(crate) fn new(max: usize) -> CreateSlots {
        let max = max.max(1);
        CreateSlots {
            max,
            semaphore: Arc::new(Semaphore::new(max)),
            waiting: Mutex::default(),
            next_ticket: AtomicU64::new(0),
            moved: watch::channel(0).0,
        }
    }

    /// Slots in use now.
    pub(crate) fn running(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }

    /// Callers waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.lock().len()
    }

    /// Waits for a slot in arrival order, calling `on_wait(ahead)` when the caller has to wait and whenever
    /// its place changes. None when `cancel` fired first (the caller's place is given up).
    pub(crate) async fn acquire(&self, cancel: &CancellationToken, mut on_wait: impl FnMut(usize)) -> Option<Slot> {
        // tokio's semaphore is fair: waiters are served in the order they first polled `acquire`. The ticket
        // is taken in the same critical section as that first poll, so ticket order is service order.
        let mut acquire = Box::pin(self.semaphore.clone().acquire_owned());
        let mut ticket = 0;
        let first = std::future::poll_fn(|cx| {
            let mut waiting = self.waiting.lock();
            ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            let polled = acquire.as_mut().poll(cx);
            if polled.is_pending() {
                waiting.insert(ticket);
            }
            Poll::Ready(polled)
        })
        .await;
        if let Poll::Ready(permit) = first {
            return Some(Slot { _permit: permit.expect("the semaphore is never closed") });
        }
        let mut moved = self.moved.subscribe();
        let ahead = || self.waiting.lock().range(..ticket).count();
        let mut last = ahead();
        on_wait(last);
        let result = loop {
            tokio::select! {
                permit = &mut acquire => break Some(Slot { _permit: permit.expect("the semaphore is never closed") }),
                _ = cancel.cancelled() => break None,
                _ = moved.changed() => {
                    let now = ahead();
                    if now != last {
                        last = now;
                        on_wait(now);
                    }
                }
            }
        };
        self.waiting.lock().remove(&ticket);
        self.moved.send_modify(|v| *v += 1);
        result
    }

    pub(crate) fn status(&self, limits: &LimitsConfig, host: &HostCapacity, promised_mib: u64) -> LimitsStatus {
        LimitsStatus {
            memory_total_mib: host.total_mib,
            memory_available_mib: host.available_mib,
            cpus: host.cpus,
            memory_overcommit_ratio: limits.memory_overcommit_ratio,
            memory_budget_mib: memory_budget_mib(limits, host),
            memory_promised_mib: promised_mib,
            max_concurrent_creates: self.max as u32,
            creates_running: self.running() as u32,
            creates_waiting: self.waiting() as u32,
        }
    }
}

/// What a waiting boot says while queued.
pub(crate) fn waiting_message(ahead: usize) -> String {
    format!("waiting for a slot: {ahead} ahead")
}

impl super::Engine {
    /// Memory promised now: recorded VMs (`rows`, the store's current list) and the warm pool.
    pub(crate) fn promised_memory_mib(&self, rows: &[VmRow]) -> u64 {
        recorded_promise_mib(rows) + self.pool_promise_mib()
    }

    /// Refuses `adds_mib` more when it would take the promise past the budget. The caller holds
    /// `Admission::allocating` until the promise is recorded.
    pub(crate) fn admit_memory(&self, what: &str, adds_mib: u64, rows: &[VmRow]) -> Result<(), ApiError> {
        let budget = memory_budget_mib(&self.cfg.limits, &HostCapacity::read());
        admit(what, adds_mib, self.promised_memory_mib(rows), budget)
    }

    pub(crate) fn limits_status(&self, rows: &[VmRow]) -> LimitsStatus {
        self.admission.slots.status(&self.cfg.limits, &HostCapacity::read(), self.promised_memory_mib(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn slots_are_served_in_arrival_order_and_never_exceed_the_limit() {
        // One slot: with more, two waiters admitted together may record their turn in either order (the
        // scheduler's), which says nothing about the queue.
        let slots = Arc::new(CreateSlots::new(1));
        let held: Vec<Slot> = vec![slots.acquire(&CancellationToken::new(), |_| panic!("free slot")).await.unwrap()];
        let order = Arc::new(Mutex::new(vec![]));
        let peak = Arc::new(AtomicU64::new(0));
        let mut tasks = vec![];
        for i in 0..8u64 {
            let (slots, order, peak) = (slots.clone(), order.clone(), peak.clone());
            let (first_wait_tx, first_wait_rx) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(async move {
                let mut first_wait = Some(first_wait_tx);
                let mut places = vec![];
                let slot = slots
                    .acquire(&CancellationToken::new(), |ahead| {
                        places.push(ahead);
                        if let Some(tx) = first_wait.take() {
                            let _ = tx.send(ahead);
                        }
                    })
                    .await
                    .unwrap();
                peak.fetch_max(slots.running() as u64, Ordering::SeqCst);
                order.lock().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
                places
            }));
            // Each waiter is queued (and told its place) before the next arrives.
            assert_eq!(first_wait_rx.await.unwrap(), i as usize, "waiter {i} sees everyone before it ahead");
        }
        assert_eq!(slots.waiting(), 8);
        drop(held);
        for (i, t) in tasks.into_iter().enumerate() {
            let places = t.await.unwrap();
            // Its place only ever went down, to 0 at the end.
            assert!(places.windows(2).all(|w| w[1] < w[0]), "waiter {i}: {places:?}");
        }
        assert_eq!(*order.lock(), (0..8).collect::<Vec<_>>(), "first come, first served");
        assert!(peak.load(Ordering::SeqCst) <= 1, "more than 1 ran at once");
        assert_eq!((slots.running(), slots.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue_and_takes_no_slot() {
        let slots = CreateSlots::new(1);
        let held = slots.acquire(&CancellationToken::new(), |_| {}).await.unwrap();
        let cancel = CancellationToken::new();
        let waiter = slots.acquire(&cancel, |_| {});
        let canceller = async {
            while slots.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            cancel.cancel();
        };
        let (got, ()) = tokio::join!(waiter, canceller);
        assert!(got.is_none());
        assert_eq!((slots.waiting(), slots.running()), (0, 1));
        drop(held);
        assert_eq!(slots.running(), 0);
        assert!(slots.acquire(&CancellationToken::new(), |_| panic!("free")).await.is_some());
    }

    #[test]
    fn the_budget_refuses_what_would_pass_it_with_the_numbers() {
        let host = HostCapacity { total_mib: 4096, available_mib: 3000, cpus: 2 };
        let limits = LimitsConfig { memory_overcommit_ratio: 1.5, memory_mib: None, max_concurrent_creates: 0 };
        assert_eq!(memory_budget_mib(&limits, &host), 6144);
        assert_eq!(max_concurrent(&limits, &host), 2);
        let capped = LimitsConfig { memory_mib: Some(1000), ..limits.clone() };
        assert_eq!(memory_budget_mib(&capped, &host), 1000);
        assert!(admit("VM a", 256, 744, 1000).is_ok(), "exactly full fits");
        let e = admit("VM b", 256, 745, 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        for n in ["256 MiB", "745 MiB", "1000 MiB", "255 MiB free"] {
            assert!(e.message.contains(n), "{n} missing in: {}", e.message);
        }
        assert!(e.hint.unwrap().contains("[limits]"));
    }

    #[test]
    fn the_hosts_memory_is_read() {
        let host = HostCapacity::read();
        assert!(host.total_mib > 0 && host.available_mib > 0 && host.available_mib <= host.total_mib, "{host:?}");
        assert!(host.cpus >= 1);
    }
}
