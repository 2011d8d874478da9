//! The shards workers record into, and the totals a collect drains them into.
//!
//! Each worker owns one [`Shard`] behind an uncontended mutex; [`Metrics::collect`]
//! drains them all into the cumulative [`Totals`] and the rolling one-minute
//! [`Window`]. The request ledger's counts live in the same shards (see `ledger`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::series::{Latency, ProviderSeries, Sample};

/// One worker's unmerged samples.
#[derive(Debug, Default)]
pub struct Shard {
    pub(super) providers: Vec<ProviderSeries>,
    /// Requests refused before they could be routed (bad headers, body, priority).
    pub(super) invalid: u64,
    /// Requests accepted (see `ledger`).
    pub(super) arrived: u64,
    /// Requests in flight now, per provider: a level, read by a collect, never drained.
    pub(super) in_flight: Vec<u64>,
}

impl Shard {
    pub fn record(&mut self, provider: usize, sample: &Sample) {
        if let Some(p) = self.providers.get_mut(provider) {
            p.record(sample);
        }
    }
}

/// A worker's handle on its shard.
pub type ShardHandle = Arc<Mutex<Shard>>;

/// The rolling window behind the dashboard's percentiles: six ten-second slots.
const SLOTS: usize = 6;
const SLOT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
struct Slot {
    upstream_latency: Latency,
    queue_wait: Latency,
}

/// The last minute of one provider's latencies, for percentiles.
#[derive(Debug, Clone)]
pub struct Window {
    slots: [Slot; SLOTS],
    current: usize,
    slot_started: Instant,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            slots: Default::default(),
            current: 0,
            slot_started: now,
        }
    }

    fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.slot_started);
        let steps = (elapsed.as_secs_f64() / SLOT.as_secs_f64()) as usize;
        for _ in 0..steps.min(SLOTS) {
            self.current = (self.current + 1) % SLOTS;
            let s = &mut self.slots[self.current];
            s.upstream_latency.reset();
            s.queue_wait.reset();
        }
        if steps > 0 {
            self.slot_started += SLOT * steps as u32;
        }
    }

    fn add(&mut self, p: &ProviderSeries) {
        let s = &mut self.slots[self.current];
        s.upstream_latency.add(&p.upstream_latency);
        for q in &p.queue_wait {
            s.queue_wait.add(q);
        }
    }

    /// Upstream latency and queue wait over the window.
    pub fn merged(&self) -> (Latency, Latency) {
        let (mut up, mut wait) = (Latency::default(), Latency::default());
        for s in &self.slots {
            up.add(&s.upstream_latency);
            wait.add(&s.queue_wait);
        }
        (up, wait)
    }
}

/// Everything drained so far.
#[derive(Debug)]
pub struct Totals {
    /// Cumulative since start, per provider (Prometheus).
    pub providers: Vec<ProviderSeries>,
    /// The last minute, per provider (the dashboard).
    pub windows: Vec<Window>,
    pub invalid: u64,
    /// Requests accepted since start.
    pub arrived: u64,
    /// Requests in flight at the collect, per provider.
    pub in_flight: Vec<u64>,
}

/// The metrics of one running sidecar; owned by [`crate::app::App`].
#[derive(Debug)]
pub struct Metrics {
    shards: Box<[ShardHandle]>,
    totals: Mutex<Totals>,
    /// Scratch for draining: swapped with a shard so its lock is held only for a swap.
    scratch: Mutex<Vec<ProviderSeries>>,
}

impl Metrics {
    pub fn new(providers: usize, workers: usize, now: Instant) -> Self {
        let shard = || {
            Arc::new(Mutex::new(Shard {
                providers: vec![ProviderSeries::default(); providers],
                invalid: 0,
                arrived: 0,
                in_flight: vec![0; providers],
            }))
        };
        Self {
            shards: (0..workers.max(1)).map(|_| shard()).collect(),
            totals: Mutex::new(Totals {
                providers: vec![ProviderSeries::default(); providers],
                windows: vec![Window::new(now); providers],
                invalid: 0,
                arrived: 0,
                in_flight: vec![0; providers],
            }),
            scratch: Mutex::new(vec![ProviderSeries::default(); providers]),
        }
    }

    /// The shard worker `worker` records into.
    pub fn shard(&self, worker: usize) -> ShardHandle {
        Arc::clone(&self.shards[worker % self.shards.len()])
    }

    /// Drains every shard into the totals and returns them, locked.
    ///
    /// Each shard is locked only to swap its series with an empty set, so a worker
    /// recording at that moment waits for a swap of a few pointers, never for a merge.
    /// Its arrivals and requests in flight are read under the same lock, so the totals
    /// keep the ledger's equation exactly.
    pub fn collect(&self, now: Instant) -> MutexGuard<'_, Totals> {
        let mut totals = self.totals.lock();
        let mut scratch = self.scratch.lock();
        for w in &mut totals.windows {
            w.rotate(now);
        }
        totals.in_flight.fill(0);
        for shard in self.shards.iter() {
            let (invalid, arrived) = {
                let mut s = shard.lock();
                std::mem::swap(&mut s.providers, &mut *scratch);
                for (total, n) in totals.in_flight.iter_mut().zip(&s.in_flight) {
                    *total += n;
                }
                (
                    std::mem::take(&mut s.invalid),
                    std::mem::take(&mut s.arrived),
                )
            };
            totals.invalid += invalid;
            totals.arrived += arrived;
            let Totals {
                providers, windows, ..
            } = &mut *totals;
            for ((series, total), window) in scratch.iter_mut().zip(providers).zip(windows) {
                if series.requests_total() == 0 {
                    continue;
                }
                total.add(series);
                window.add(series);
                series.reset();
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Lane;
    use crate::metrics::{Entry, Outcome};
    use crate::priority::Priority;

    fn sample(ms: u64) -> Sample {
        Sample {
            route: Lane::Limited,
            outcome: Outcome::Success,
            error: None,
            priority: Priority::Normal,
            upstream_latency: Some(Duration::from_millis(ms)),
            ttfb: None,
            duration: Duration::from_millis(ms),
            queue_wait: Some(Duration::ZERO),
        }
    }

    #[test]
    fn collect_moves_every_workers_samples_into_totals_exactly_once() {
        let t0 = Instant::now();
        let m = Metrics::new(2, 3, t0);
        for w in 0..3 {
            let shard = m.shard(w);
            for _ in 0..=w {
                shard.lock().record(1, &sample(10));
            }
        }
        Entry::arrive(m.shard(0), 0).settle_invalid(&Sample {
            route: Lane::None,
            outcome: Outcome::ClientError,
            ..sample(1)
        });
        assert_eq!(m.collect(t0).providers[1].requests_total(), 6);
        let totals = m.collect(t0);
        assert_eq!(totals.providers[1].requests_total(), 6, "no double count");
        assert_eq!(totals.providers[0].requests_total(), 1);
        assert_eq!((totals.invalid, totals.arrived), (1, 1));
        assert_eq!(totals.windows[1].merged().0.count(), 6);
    }

    #[test]
    fn the_window_forgets_samples_older_than_a_minute_but_totals_keep_them() {
        let t0 = Instant::now();
        let m = Metrics::new(1, 1, t0);
        m.shard(0).lock().record(0, &sample(900));
        drop(m.collect(t0));
        m.shard(0).lock().record(0, &sample(100));
        let totals = m.collect(t0 + Duration::from_secs(35));
        let (up, _) = totals.windows[0].merged();
        assert_eq!(up.count(), 2);
        drop(totals);
        let totals = m.collect(t0 + Duration::from_secs(61));
        let (up, _) = totals.windows[0].merged();
        assert_eq!(up.count(), 1, "the first sample is over a minute old");
        assert!(up.quantile_ms(0.99).unwrap() < 200.0);
        assert_eq!(totals.providers[0].upstream_latency.count(), 2);
        drop(totals);
        let totals = m.collect(t0 + Duration::from_secs(600));
        assert_eq!(totals.windows[0].merged().0.count(), 0);
    }

    #[test]
    fn recording_from_many_threads_while_collecting_loses_nothing() {
        let t0 = Instant::now();
        let m = Arc::new(Metrics::new(1, 4, t0));
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let shard = m.shard(w);
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        shard.lock().record(0, &sample(i % 100 + 1));
                    }
                })
            })
            .collect();
        let mut seen = 0;
        while threads.iter().any(|t| !t.is_finished()) {
            seen = m.collect(Instant::now()).providers[0].requests_total();
        }
        for t in threads {
            t.join().unwrap();
        }
        let totals = m.collect(Instant::now());
        assert_eq!(totals.providers[0].requests_total(), 80_000);
        assert_eq!(totals.providers[0].upstream_latency.count(), 80_000);
        assert!(seen <= 80_000);
    }
}
