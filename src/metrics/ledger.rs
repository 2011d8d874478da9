//! The request ledger: each request the proxy accepts is counted once as arrived, is in
//! flight until its answer's last byte (or its abandonment), and ends exactly once with
//! an outcome. So `arrived = Σ requests_total + Σ in_flight` — an operator's check that
//! no request was lost or counted twice.
//!
//! An [`Entry`] is one request's place in the ledger, an RAII guard: made at acceptance
//! (arrived + 1, in flight + 1 under the provider it is counted for), moved when routing
//! picks another provider, and settled when the request's record is finished, which
//! counts its outcome and takes it out of flight in one step. An entry dropped unsettled
//! (its record was never finished) is settled as `client_gone` on route `none`, so a
//! cancelled task cannot leak a count.
//!
//! The three counts live in the worker's [`Shard`], which only the worker writes; each
//! change of them is one step under the shard's sequence, and a collect reads each
//! shard between two steps, so every scrape and every snapshot keeps the equation
//! exactly, not only at rest (requests never move between shards). Arrivals carry no
//! provider: it is known only once routing has read the body. Until then a request is
//! in flight, and ends if refused, under the default provider.

use super::cells::add;
use super::series::{Lane, Outcome, Sample};
use super::shards::{Shard, ShardHandle};

/// One accepted request's place in the ledger, until it is settled.
#[derive(Debug)]
pub struct Entry {
    shard: ShardHandle,
    /// The provider the request is in flight for, and will end under.
    provider: usize,
    settled: bool,
}

impl Entry {
    /// Counts a request accepted by the worker owning `shard`, in flight for `provider`.
    pub fn arrive(shard: ShardHandle, provider: usize) -> Self {
        shard.arrive(provider);
        Self {
            shard,
            provider,
            settled: false,
        }
    }

    /// The provider the request is counted for.
    pub fn provider(&self) -> usize {
        self.provider
    }

    /// Routing picked `provider`: the request is in flight there from now on.
    pub fn route_to(&mut self, provider: usize) {
        if provider != self.provider {
            self.shard.reroute(self.provider, provider);
            self.provider = provider;
        }
    }

    /// The request ended as `sample` says.
    pub fn settle(mut self, sample: &Sample) {
        self.settled = true;
        self.shard.settle(self.provider, sample, false);
    }

    /// The request was refused before routing (bad headers, body or priority): it also
    /// counts in `sidecar_invalid_requests_total`.
    pub fn settle_invalid(mut self, sample: &Sample) {
        self.settled = true;
        self.shard.settle(self.provider, sample, true);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.settled {
            // A record always settles its entry; this keeps the count if one did not.
            self.shard.abandon(self.provider);
        }
    }
}

// === impl Shard ===

// Each is one step of the ledger (`Shard::step`), run by the shard's worker.
impl Shard {
    fn arrive(&self, provider: usize) {
        self.step(|s| {
            s.count_arrival();
            if let Some(n) = s.in_flight(provider) {
                add(n, 1);
            }
        });
    }

    fn reroute(&self, from: usize, to: usize) {
        self.step(|s| {
            s.leave(from);
            if let Some(n) = s.in_flight(to) {
                add(n, 1);
            }
        });
    }

    fn settle(&self, provider: usize, sample: &Sample, invalid: bool) {
        // Outside the step: the latencies are no part of the equation.
        self.record_latencies(provider, sample);
        self.step(|s| {
            s.leave(provider);
            s.count(provider, sample);
            if invalid {
                s.count_invalid();
            }
        });
    }

    /// Ends a request nothing is known about (see [`Entry`]'s `Drop`): its outcome is
    /// counted, without latencies.
    fn abandon(&self, provider: usize) {
        self.step(|s| {
            s.leave(provider);
            if let Some(n) = s.requests(provider, Lane::None, Outcome::ClientGone) {
                add(n, 1);
            }
        });
    }

    fn leave(&self, provider: usize) {
        if let Some(n) = self.in_flight(provider) {
            let now = n.load(std::sync::atomic::Ordering::Relaxed);
            debug_assert!(now > 0, "a request left flight twice");
            n.store(now.saturating_sub(1), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::metrics::Metrics;
    use crate::priority::Priority;

    fn sample(route: Lane, outcome: Outcome) -> Sample {
        Sample {
            route,
            outcome,
            error: None,
            priority: Priority::Normal,
            upstream_latency: None,
            ttfb: None,
            duration: Duration::from_millis(3),
            queue_wait: None,
        }
    }

    /// `(arrived, ended, in flight per provider)` after a collect.
    fn ledger(m: &Metrics) -> (u64, u64, Vec<u64>) {
        let t = m.collect(Instant::now());
        let ended = t.providers.iter().map(|p| p.requests_total()).sum();
        (t.arrived, ended, t.in_flight.clone())
    }

    #[test]
    fn an_entry_is_in_flight_from_arrival_until_settled_under_the_provider_routed_to() {
        let m = Metrics::new(2, 1, Instant::now());
        let mut e = Entry::arrive(m.shard(0), 0);
        assert_eq!(ledger(&m), (1, 0, vec![1, 0]));
        e.route_to(1);
        assert_eq!(e.provider(), 1);
        assert_eq!(ledger(&m), (1, 0, vec![0, 1]));
        e.settle(&sample(Lane::Limited, Outcome::Success));
        assert_eq!(ledger(&m), (1, 1, vec![0, 0]));
        let t = m.collect(Instant::now());
        assert_eq!(
            t.providers[1].requests[Lane::Limited as usize][Outcome::Success as usize],
            1
        );
        assert_eq!(t.invalid, 0);
    }

    #[test]
    fn a_refusal_before_routing_ends_under_the_default_provider_and_counts_as_invalid() {
        let m = Metrics::new(2, 1, Instant::now());
        Entry::arrive(m.shard(0), 1).settle_invalid(&sample(Lane::None, Outcome::ClientError));
        let t = m.collect(Instant::now());
        assert_eq!(
            t.providers[1].requests[Lane::None as usize][Outcome::ClientError as usize],
            1
        );
        assert_eq!(
            (t.arrived, t.invalid, t.in_flight.clone()),
            (1, 1, vec![0, 0])
        );
    }

    #[test]
    fn an_entry_dropped_unsettled_ends_once_as_client_gone_on_route_none() {
        let m = Metrics::new(1, 1, Instant::now());
        drop(Entry::arrive(m.shard(0), 0));
        let t = m.collect(Instant::now());
        assert_eq!(
            t.providers[0].requests[Lane::None as usize][Outcome::ClientGone as usize],
            1
        );
        assert_eq!((t.arrived, t.in_flight.clone()), (1, vec![0]));
    }

    #[test]
    fn every_collect_balances_while_workers_arrive_route_and_settle() {
        const PER_WORKER: u64 = 20_000;
        let m = std::sync::Arc::new(Metrics::new(2, 3, Instant::now()));
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let shard = m.shard(w);
                std::thread::spawn(move || {
                    let mut open = Vec::new();
                    for i in 0..PER_WORKER {
                        let mut e = Entry::arrive(std::sync::Arc::clone(&shard), 0);
                        if i % 2 == 0 {
                            e.route_to(1);
                        }
                        open.push(e);
                        if open.len() > 8 {
                            let e = open.swap_remove((i % 8) as usize);
                            match i % 3 {
                                0 => e.settle(&sample(Lane::Limited, Outcome::Success)),
                                1 => drop(e),
                                _ => e.settle_invalid(&sample(Lane::None, Outcome::ClientError)),
                            }
                        }
                    }
                    drop(open);
                })
            })
            .collect();
        let mut collects = 0;
        while workers.iter().any(|w| !w.is_finished()) {
            let (arrived, ended, in_flight) = ledger(&m);
            assert_eq!(arrived, ended + in_flight.iter().sum::<u64>());
            collects += 1;
        }
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(ledger(&m), (3 * PER_WORKER, 3 * PER_WORKER, vec![0, 0]));
        assert!(collects > 0);
    }
}
