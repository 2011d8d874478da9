//! The shards workers record into, and the totals a collect builds from them.
//!
//! Each worker owns one [`Shard`] of atomic cells (see `cells`) that it alone writes:
//! recording takes no lock, not even its own. [`Metrics::collect`] reads every shard
//! and adds what each recorded since the last collect to the cumulative [`Totals`] and
//! the rolling one-minute [`Window`]. The request ledger's counts live in the same
//! shards (see `ledger`), under a sequence that lets a collect read them consistently.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::cells::{add, LatencyCells, LatencySeen};
use super::series::{ErrorKind, Lane, Latency, Outcome, ProviderSeries, Sample};

const LANES: usize = Lane::ALL.len();
const OUTCOMES: usize = Outcome::ALL.len();
const ERRORS: usize = ErrorKind::ALL.len();
const PRIORITIES: usize = 3;

/// One worker's cells: its requests' latencies and outcomes, and the ledger's counts.
///
/// **One writer**: only the worker's thread records into its shard (the server never
/// moves a request to another thread), so every cell is added to with a load and a
/// store (see `cells`); debug builds check it.
///
/// **The ledger's counts** (arrived, refused as invalid, in flight, requests by route
/// and outcome, errors) change together, one step per arrival, reroute or end, and
/// `arrived = Σ requests + Σ in flight` holds between any two steps. The worker makes
/// `seq` odd before a step and even after it; a collect reads the counts between two
/// loads of `seq` and keeps them only if both found the same even number, so what it
/// reads is the state between two steps, never the middle of one (Boehm's seqlock, as
/// `snapshot::SeqLock`, with one writer that needs no CAS to claim it). The writer never
/// waits; a reader retries only while a step is under way. Latencies are outside the
/// sequence: no equation binds them to the counts, so a collect may take a request's
/// latency one collect before or after its outcome, never twice and never not at all.
#[derive(Debug)]
pub struct Shard {
    /// Even between steps of the ledger, odd during one.
    seq: AtomicU64,
    /// Requests accepted (see `ledger`).
    arrived: AtomicU64,
    /// Requests refused before they could be routed (bad headers, body, priority).
    invalid: AtomicU64,
    /// Requests in flight now, per provider: a level, never taken away.
    in_flight: Box<[AtomicU64]>,
    providers: Box<[SeriesCells]>,
    /// The thread that writes this shard (debug builds check there is one).
    #[cfg(debug_assertions)]
    writer: std::sync::OnceLock<std::thread::ThreadId>,
}

/// One provider's cells in one shard: what [`ProviderSeries`] holds, as atomics.
#[derive(Debug, Default)]
struct SeriesCells {
    upstream_latency: LatencyCells,
    ttfb: LatencyCells,
    /// By route (`Lane as usize`).
    duration: [LatencyCells; LANES],
    /// By priority (`Priority as usize`).
    queue_wait: [LatencyCells; PRIORITIES],
    /// `[route][outcome]`, under the shard's sequence.
    requests: [[AtomicU64; OUTCOMES]; LANES],
    /// Under the shard's sequence.
    errors: [AtomicU64; ERRORS],
}

impl SeriesCells {
    /// The sample's latencies (its counts go in a step of the ledger: [`SeriesCells::count`]).
    fn record_latencies(&self, s: &Sample) {
        if let Some(d) = s.upstream_latency {
            self.upstream_latency.record(d);
        }
        if let Some(d) = s.ttfb {
            self.ttfb.record(d);
        }
        self.duration[s.route as usize].record(s.duration);
        if let Some(d) = s.queue_wait {
            self.queue_wait[s.priority as usize].record(d);
        }
    }

    fn count(&self, s: &Sample) {
        add(&self.requests[s.route as usize][s.outcome as usize], 1);
        if let Some(k) = s.error {
            add(&self.errors[k as usize], 1);
        }
    }
}

/// One turn of a reader waiting out a step of the ledger: a spin at first, then a yield,
/// since a worker preempted mid-step keeps the sequence odd for a time slice.
fn back_off(turn: u32) {
    if turn > 64 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

impl Shard {
    fn new(providers: usize) -> Self {
        Self {
            seq: AtomicU64::new(0),
            arrived: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            in_flight: (0..providers).map(|_| AtomicU64::new(0)).collect(),
            providers: (0..providers).map(|_| SeriesCells::default()).collect(),
            #[cfg(debug_assertions)]
            writer: std::sync::OnceLock::new(),
        }
    }

    /// Runs `change` as one step of the ledger (see [`Shard`]).
    #[inline]
    pub(super) fn step(&self, change: impl FnOnce(&Self)) {
        #[cfg(debug_assertions)]
        {
            let me = std::thread::current().id();
            let writer = *self.writer.get_or_init(|| me);
            debug_assert_eq!(writer, me, "a shard is written by one thread only");
        }
        // Only this thread stores `seq`, so its own last store is what it loads.
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd number before the step's stores: a reader that loads any of
        // them, then fences (Acquire), loads `seq` as odd or later.
        fence(Ordering::Release);
        change(self);
        // Publishes the step: a reader that loads this even number (Acquire) loads
        // every store of the step.
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Counts one finished request for `provider` (no ledger entry: see `ledger`).
    pub fn record(&self, provider: usize, sample: &Sample) {
        if let Some(p) = self.providers.get(provider) {
            p.record_latencies(sample);
            self.step(|_| p.count(sample));
        }
    }

    /// The sample's latencies for `provider` (see [`SeriesCells::record_latencies`]).
    pub(super) fn record_latencies(&self, provider: usize, sample: &Sample) {
        if let Some(p) = self.providers.get(provider) {
            p.record_latencies(sample);
        }
    }

    /// The sample's counts for `provider`; inside a step.
    pub(super) fn count(&self, provider: usize, sample: &Sample) {
        if let Some(p) = self.providers.get(provider) {
            p.count(sample);
        }
    }

    pub(super) fn count_arrival(&self) {
        add(&self.arrived, 1);
    }

    pub(super) fn count_invalid(&self) {
        add(&self.invalid, 1);
    }

    /// `provider`'s cell of requests in flight.
    pub(super) fn in_flight(&self, provider: usize) -> Option<&AtomicU64> {
        self.in_flight.get(provider)
    }

    /// `provider`'s count of requests ended on `lane` as `outcome`.
    pub(super) fn requests(
        &self,
        provider: usize,
        lane: Lane,
        outcome: Outcome,
    ) -> Option<&AtomicU64> {
        self.providers
            .get(provider)
            .map(|p| &p.requests[lane as usize][outcome as usize])
    }

    /// Reads the ledger's counts as they stood between two steps (see [`Shard`]).
    fn read_counts(&self, into: &mut Counts) {
        let mut turn = 0;
        loop {
            let s = self.seq.load(Ordering::Acquire);
            if s.is_multiple_of(2) {
                into.arrived = self.arrived.load(Ordering::Relaxed);
                into.invalid = self.invalid.load(Ordering::Relaxed);
                for (n, cell) in into.in_flight.iter_mut().zip(self.in_flight.iter()) {
                    *n = cell.load(Ordering::Relaxed);
                }
                for ((requests, errors), p) in into
                    .requests
                    .iter_mut()
                    .zip(&mut into.errors)
                    .zip(self.providers.iter())
                {
                    for (n, cell) in requests
                        .iter_mut()
                        .flatten()
                        .zip(p.requests.iter().flatten())
                    {
                        *n = cell.load(Ordering::Relaxed);
                    }
                    for (n, cell) in errors.iter_mut().zip(&p.errors) {
                        *n = cell.load(Ordering::Relaxed);
                    }
                }
                // Orders the loads above before the check: had any of them seen a store
                // of a step begun after `s`, this load sees that step's odd number.
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s {
                    return;
                }
            }
            back_off(turn);
            turn += 1;
        }
    }
}

/// A worker's handle on its shard.
pub type ShardHandle = Arc<Shard>;

/// The ledger's counts of one shard as a collect read them.
#[derive(Debug)]
struct Counts {
    arrived: u64,
    invalid: u64,
    in_flight: Vec<u64>,
    requests: Vec<[[u64; OUTCOMES]; LANES]>,
    errors: Vec<[u64; ERRORS]>,
}

impl Counts {
    fn new(providers: usize) -> Self {
        Self {
            arrived: 0,
            invalid: 0,
            in_flight: vec![0; providers],
            requests: vec![Default::default(); providers],
            errors: vec![Default::default(); providers],
        }
    }
}

/// What a collect has taken from one provider's cells in one shard.
#[derive(Debug, Default)]
struct SeriesSeen {
    upstream_latency: LatencySeen,
    ttfb: LatencySeen,
    duration: [LatencySeen; LANES],
    queue_wait: [LatencySeen; PRIORITIES],
}

impl SeriesSeen {
    /// Adds to `into` what `cells` recorded since the last take; whether there was any.
    fn take(&mut self, cells: &SeriesCells, into: &mut ProviderSeries) -> bool {
        let mut any = self
            .upstream_latency
            .take(&cells.upstream_latency, &mut into.upstream_latency);
        any |= self.ttfb.take(&cells.ttfb, &mut into.ttfb);
        for ((seen, cells), into) in self
            .duration
            .iter_mut()
            .zip(&cells.duration)
            .zip(&mut into.duration)
        {
            any |= seen.take(cells, into);
        }
        for ((seen, cells), into) in self
            .queue_wait
            .iter_mut()
            .zip(&cells.queue_wait)
            .zip(&mut into.queue_wait)
        {
            any |= seen.take(cells, into);
        }
        any
    }
}

/// What a collect has taken from one shard so far: its counts as last read (the counts
/// only grow, so what is new is the difference) and its latencies.
#[derive(Debug)]
struct ShardSeen {
    counts: Counts,
    series: Vec<SeriesSeen>,
}

/// The collector's side: what it has seen of each shard, and scratch.
#[derive(Debug)]
struct Collector {
    seen: Vec<ShardSeen>,
    /// The counts being read.
    counts: Counts,
    /// What one shard recorded since the last collect, per provider.
    new: Vec<ProviderSeries>,
}

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
    collector: Mutex<Collector>,
}

impl Metrics {
    pub fn new(providers: usize, workers: usize, now: Instant) -> Self {
        let shards: Box<[ShardHandle]> = (0..workers.max(1))
            .map(|_| Arc::new(Shard::new(providers)))
            .collect();
        let seen = shards
            .iter()
            .map(|_| ShardSeen {
                counts: Counts::new(providers),
                series: (0..providers).map(|_| SeriesSeen::default()).collect(),
            })
            .collect();
        Self {
            shards,
            totals: Mutex::new(Totals {
                providers: vec![ProviderSeries::default(); providers],
                windows: vec![Window::new(now); providers],
                invalid: 0,
                arrived: 0,
                in_flight: vec![0; providers],
            }),
            collector: Mutex::new(Collector {
                seen,
                counts: Counts::new(providers),
                new: vec![ProviderSeries::default(); providers],
            }),
        }
    }

    /// The shard worker `worker` records into (it alone: see [`Shard`]).
    pub fn shard(&self, worker: usize) -> ShardHandle {
        Arc::clone(&self.shards[worker % self.shards.len()])
    }

    /// Adds what every shard recorded since the last collect to the totals and returns
    /// them, locked.
    ///
    /// Workers never wait for it. Each shard's ledger counts are read as they stood
    /// between two of its steps, so the totals keep the ledger's equation exactly.
    pub fn collect(&self, now: Instant) -> MutexGuard<'_, Totals> {
        let mut totals = self.totals.lock();
        let mut collector = self.collector.lock();
        let Collector { seen, counts, new } = &mut *collector;
        for w in &mut totals.windows {
            w.rotate(now);
        }
        totals.in_flight.fill(0);
        for (shard, seen) in self.shards.iter().zip(seen.iter_mut()) {
            shard.read_counts(counts);
            totals.arrived += counts.arrived.wrapping_sub(seen.counts.arrived);
            totals.invalid += counts.invalid.wrapping_sub(seen.counts.invalid);
            for (total, n) in totals.in_flight.iter_mut().zip(&counts.in_flight) {
                *total += n;
            }
            let Totals {
                providers, windows, ..
            } = &mut *totals;
            let providers = providers
                .iter_mut()
                .zip(windows.iter_mut())
                .zip(new.iter_mut());
            for (p, ((total, window), new)) in providers.enumerate() {
                let mut any = seen.series[p].take(&shard.providers[p], new);
                let pairs = new.requests.iter_mut().flatten().zip(
                    counts.requests[p]
                        .iter()
                        .flatten()
                        .zip(seen.counts.requests[p].iter().flatten()),
                );
                for (new, (now, before)) in pairs {
                    *new = now.wrapping_sub(*before);
                    any |= *new != 0;
                }
                let pairs = new
                    .errors
                    .iter_mut()
                    .zip(counts.errors[p].iter().zip(&seen.counts.errors[p]));
                for (new, (now, before)) in pairs {
                    *new = now.wrapping_sub(*before);
                    any |= *new != 0;
                }
                if any {
                    total.add(new);
                    window.add(new);
                    new.reset();
                }
            }
            std::mem::swap(&mut seen.counts, counts);
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Entry, ErrorKind, Lane, Outcome};
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
                shard.record(1, &sample(10));
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
        m.shard(0).record(0, &sample(900));
        drop(m.collect(t0));
        m.shard(0).record(0, &sample(100));
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
                        shard.record(0, &sample(i % 100 + 1));
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

    #[test]
    fn a_reader_collecting_while_a_worker_records_sees_totals_grow_and_end_exact() {
        const N: u64 = 50_000;
        let t0 = Instant::now();
        let m = Arc::new(Metrics::new(2, 1, t0));
        let shard = m.shard(0);
        let worker = std::thread::spawn(move || {
            let mut open = std::collections::VecDeque::new();
            for i in 0..N {
                let mut e = Entry::arrive(Arc::clone(&shard), 0);
                e.route_to((i % 2) as usize);
                open.push_back(e);
                if open.len() > 4 {
                    let e = open.pop_front().unwrap();
                    e.settle(&Sample {
                        error: (i % 7 == 0).then_some(ErrorKind::Stream),
                        ..sample(i % 2000 + 1)
                    });
                }
            }
            for e in open {
                e.settle(&sample(5));
            }
        });
        // What one collect saw: arrived, ended, in flight, latencies counted, their sum,
        // errors.
        let look = |m: &Metrics| {
            let t = m.collect(Instant::now());
            let ended: u64 = t.providers.iter().map(ProviderSeries::requests_total).sum();
            let counted: u64 = t.providers.iter().map(|p| p.upstream_latency.count()).sum();
            let sum: f64 = t
                .providers
                .iter()
                .map(|p| p.duration[0].sum_seconds())
                .sum();
            let errors: u64 = t.providers.iter().map(ProviderSeries::errors_total).sum();
            (
                t.arrived,
                ended,
                t.in_flight.iter().sum::<u64>(),
                counted,
                sum,
                errors,
            )
        };
        let mut last = (0, 0, 0, 0, 0.0, 0);
        let mut collects = 0;
        while !worker.is_finished() {
            let now = look(&m);
            let (arrived, ended, in_flight, counted, sum, errors) = now;
            assert_eq!(
                arrived,
                ended + in_flight,
                "the ledger balances at every collect"
            );
            assert!(
                arrived >= last.0 && ended >= last.1 && counted >= last.3,
                "{now:?} after {last:?}"
            );
            assert!(sum >= last.4 && errors >= last.5, "{now:?} after {last:?}");
            last = now;
            collects += 1;
        }
        worker.join().unwrap();
        let (arrived, ended, in_flight, counted, _, errors) = look(&m);
        assert_eq!((arrived, ended, in_flight, counted), (N, N, 0, N));
        assert_eq!(
            errors,
            (0..N).filter(|i| i % 7 == 0 && *i >= 4).count() as u64
        );
        assert!(collects > 0);
    }
}
