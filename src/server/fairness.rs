//! Fairness between connections at the connection cap.
//!
//! A connection that has not sent a byte yet is *silent*. Each worker keeps its silent
//! connections in arrival order ([`SilentSet`]). When an accept brings the connections
//! of all workers within [`Cap::headroom`] of the cap, the worker closes its oldest
//! silent connection to make room, instead of letting the cap fill up and accepting
//! pause; a worker with none to close asks the others ([`Cap::answer_calls`]). A flood
//! of silent connections then only cycles through the cap, and a client that sends its
//! request waits no longer than the accept queue takes to drain. Connections that have
//! spoken are never shed: at the cap with those, accepting pauses as before.
//!
//! Optionally, [`PerIp`] caps the connections one client address holds at once (all
//! workers together); a connection beyond it is closed as soon as it is accepted.
//!
//! Cost per connection: one `BTreeMap` insert and remove on the worker's own thread
//! (no lock) and one atomic load of the shared permit count; the per-address map (a
//! sharded lock) only when its cap is set.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

// === impl Cap ===

/// The connection cap shared by all workers, and their calls to each other for room.
#[derive(Debug)]
pub(super) struct Cap {
    permits: Arc<Semaphore>,
    /// Free permits below which an accept sheds a silent connection.
    headroom: usize,
    /// Rung by a worker that must make room and has no silent connection to close.
    room_wanted: Notify,
}

impl Cap {
    /// A cap of `max` connections; shedding starts above 95% of it.
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            headroom: (max / 20).max(1),
            room_wanted: Notify::new(),
        })
    }

    /// A connection's place under the cap: waits while the cap is reached.
    pub(super) async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).acquire_owned().await.ok()
    }

    /// Called after each accept: near the cap, closes this worker's oldest silent
    /// connection, or asks the other workers to close theirs. One accept sheds at most
    /// one, so the connections open stay near `max - headroom` under a flood.
    pub(super) fn make_room(&self, silent: &SilentSet) {
        // Another worker may take or free a permit meanwhile: a stale count sheds one
        // connection early or late, which is all it can cost.
        if self.permits.available_permits() >= self.headroom {
            return;
        }
        if silent.shed_oldest() {
            tracing::debug!("near the connection cap: closed the oldest silent connection");
        } else {
            self.room_wanted.notify_waiters();
        }
    }

    /// Closes this worker's oldest silent connection whenever another worker asks for
    /// room, until `stop`.
    pub(super) async fn answer_calls(&self, silent: Rc<SilentSet>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.room_wanted.notified() => {
                    silent.shed_oldest();
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

// === impl SilentSet ===

/// One worker's silent connections, oldest first (on the worker's thread: no lock).
#[derive(Debug, Default)]
pub(super) struct SilentSet {
    next: Cell<u64>,
    /// Arrival number → the connection's task, which is aborted to close it.
    by_age: RefCell<BTreeMap<u64, AbortHandle>>,
    shed: Cell<u64>,
}

impl SilentSet {
    /// A new connection's place at the back of the line: it can be shed once its task
    /// is [`watch`](Self::watch)ed, until the place is dropped (at its first byte).
    pub(super) fn enter(self: &Rc<Self>) -> Silent {
        let key = self.next.get();
        self.next.set(key + 1);
        Silent {
            set: Rc::clone(self),
            key,
        }
    }

    /// Makes the connection holding place `key` sheddable by aborting `task`. Called
    /// right after `spawn_local`, which never polls the task before returning, so the
    /// place cannot have been given up yet.
    pub(super) fn watch(&self, key: u64, task: AbortHandle) {
        self.by_age.borrow_mut().insert(key, task);
    }

    /// Closes the oldest silent connection (its task is dropped, and with it the socket
    /// and its permit); false when there is none.
    pub(super) fn shed_oldest(&self) -> bool {
        let oldest = self.by_age.borrow_mut().pop_first();
        match oldest {
            Some((_, task)) => {
                task.abort();
                self.shed.set(self.shed.get() + 1);
                true
            }
            None => false,
        }
    }

    /// Silent connections now.
    pub(super) fn len(&self) -> usize {
        self.by_age.borrow().len()
    }

    /// Silent connections shed so far.
    pub(super) fn shed(&self) -> u64 {
        self.shed.get()
    }
}

/// A connection's place among the silent ones; dropped at its first byte (or close).
#[derive(Debug)]
pub(super) struct Silent {
    set: Rc<SilentSet>,
    key: u64,
}

impl Silent {
    pub(super) fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.set.by_age.borrow_mut().remove(&self.key);
    }
}

// === impl PerIp ===

/// Connections open per client address, all workers together, under a cap.
#[derive(Debug)]
pub(super) struct PerIp {
    max: usize,
    open: DashMap<IpAddr, usize>,
}

impl PerIp {
    pub(super) fn new(max: NonZeroUsize) -> Arc<Self> {
        Arc::new(Self {
            max: max.get(),
            open: DashMap::new(),
        })
    }

    /// One more connection from `ip`, or `None` when it already holds the cap.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpHold> {
        // An IPv4 client of a dual-stack listener is one address, however it shows up.
        let ip = ip.to_canonical();
        {
            let mut n = self.open.entry(ip).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(IpHold {
            per_ip: Arc::clone(self),
            ip,
        })
    }

    /// Connections open from `ip` now.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).map_or(0, |n| *n)
    }
}

/// One connection counted against its address; released when dropped.
#[derive(Debug)]
pub(super) struct IpHold {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpHold {
    fn drop(&mut self) {
        // The entry goes with its last connection, so the map holds only open ones.
        self.per_ip.open.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn local_test(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    /// `n` tasks that hold a silent place until shed or told to speak.
    fn silent_tasks(
        set: &Rc<SilentSet>,
        n: usize,
    ) -> Vec<(tokio::task::JoinHandle<()>, Rc<Notify>)> {
        (0..n)
            .map(|_| {
                let place = set.enter();
                let key = place.key();
                let speak = Rc::new(Notify::new());
                let s = Rc::clone(&speak);
                let task = tokio::task::spawn_local(async move {
                    s.notified().await;
                    drop(place);
                    std::future::pending::<()>().await;
                });
                set.watch(key, task.abort_handle());
                (task, speak)
            })
            .collect()
    }

    #[test]
    fn the_oldest_silent_connection_is_shed_first_and_one_that_spoke_never() {
        local_test(async {
            let set = Rc::new(SilentSet::default());
            let tasks = silent_tasks(&set, 4);
            tokio::task::yield_now().await;
            // The oldest speaks: it leaves the line.
            tasks[0].1.notify_one();
            tokio::task::yield_now().await;
            assert_eq!(set.len(), 3);
            assert!(set.shed_oldest());
            tokio::task::yield_now().await;
            let done: Vec<bool> = tasks.iter().map(|(t, _)| t.is_finished()).collect();
            assert_eq!(done, [false, true, false, false]);
            assert!(set.shed_oldest() && set.shed_oldest());
            assert!(!set.shed_oldest(), "none left to shed");
            tokio::task::yield_now().await;
            assert!(!tasks[0].0.is_finished(), "the one that spoke is kept");
            assert_eq!((set.len(), set.shed()), (0, 3));
        });
    }

    #[test]
    fn a_worker_with_nothing_to_shed_asks_the_others() {
        local_test(async {
            let cap = Cap::new(2);
            let mine = Rc::new(SilentSet::default());
            let theirs = Rc::new(SilentSet::default());
            let tasks = silent_tasks(&theirs, 1);
            let stop = CancellationToken::new();
            tokio::task::spawn_local({
                let (cap, theirs, stop) = (Arc::clone(&cap), Rc::clone(&theirs), stop.clone());
                async move { cap.answer_calls(theirs, stop).await }
            });
            tokio::task::yield_now().await;
            let _a = cap.acquire().await.unwrap();
            cap.make_room(&mine);
            assert_eq!(theirs.shed(), 0, "room enough: nothing shed");
            let _b = cap.acquire().await.unwrap();
            cap.make_room(&mine);
            tokio::task::yield_now().await;
            assert_eq!(theirs.shed(), 1);
            tokio::task::yield_now().await;
            assert!(tasks[0].0.is_finished());
            stop.cancel();
        });
    }

    #[test]
    fn an_address_holds_at_most_its_cap_and_gets_each_slot_back() {
        let per_ip = PerIp::new(NonZeroUsize::new(2).unwrap());
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let first = per_ip.admit(a).unwrap();
        let _second = per_ip.admit(a).unwrap();
        assert!(per_ip.admit(a).is_none());
        // The same client through a dual-stack listener is the same address.
        assert!(per_ip
            .admit(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()))
            .is_none());
        let _other = per_ip.admit(b).unwrap();
        drop(first);
        assert_eq!(per_ip.open_from(a), 1);
        let _again = per_ip.admit(a).unwrap();
        drop((_again, _second));
        assert_eq!(per_ip.open_from(a), 0);
        assert_eq!(
            per_ip.open.len(),
            1,
            "only addresses with open connections are kept"
        );
    }
}
