//! The dashboard snapshot: built once per tick by one publisher (`dashboard`), read by
//! every client.
//!
//! A [`Snapshot`] is plain fixed-size data (`Pod`: counters, gauges, percentiles and a
//! minute of history per provider) published through a [`SeqLock`]: the publisher
//! never waits for readers, and a reader copies it without allocating and retries if
//! a publish tore its copy. The [`Hub`] adds a build counter, a count of open SSE
//! clients and a `watch` channel that wakes the streams when a new sequence is out.
//! However many clients there are, a tick costs one build; each worker then turns a
//! sequence into JSON once and every stream on that worker sends the same bytes.
//!
//! The snapshot holds the first [`MAX_PROVIDERS`] providers; `/metrics` has them all. Its
//! request ledger (arrived, outcomes, in flight) comes from the same collect of the
//! metrics shards as its panels', so it keeps `arrived = outcomes + in flight` exactly,
//! and its totals cover every provider.

pub mod seqlock;

use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};
use tokio::sync::watch;

use crate::limiter::DropReason;
use crate::metrics::Outcome;

pub use seqlock::SeqLock;

/// Providers a snapshot has room for.
pub const MAX_PROVIDERS: usize = 16;
/// Points of history kept per provider (one per tick).
pub const HISTORY: usize = 60;

/// One history point; `NaN` where there was no value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq)]
pub struct Point {
    pub rps: f32,
    pub p99_ms: f32,
    pub queue: f32,
    pub effective_rpm: f32,
    pub learned_rpm: f32,
    pub ceiling_rpm: f32,
}

/// One provider at one tick. Percentiles cover the last minute; `NaN` means no data.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Panel {
    /// Requests routed to the provider (`ProviderStats::total`).
    pub total: u64,
    /// Requests ended, by `Outcome as usize` (all routes), and in flight now: the
    /// provider's part of the request ledger.
    pub outcomes: [u64; Outcome::ALL.len()],
    pub in_flight: u64,
    pub limited: u64,
    pub passthrough: u64,
    pub rate_limited: u64,
    pub queue_full: u64,
    pub dropped_low_priority: u64,
    pub dropped_timeout: u64,
    pub upstream_errors: u64,
    pub upstream_429: u64,
    pub retries: u64,
    pub queue_depth: [u64; 3],
    pub queue_total: u64,
    pub queue_max: u64,
    /// The queue's totals since start, all priorities: parked, taken out with a token,
    /// and taken out without one by `DropReason as usize`.
    pub queue_enqueued: u64,
    pub queue_dequeued: u64,
    pub queue_dropped: [u64; DropReason::ALL.len()],
    /// `RetreatState as u64`.
    pub retreat_state: u64,
    pub upstream_429_last_minute: u64,
    pub responses_last_minute: u64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub rate_429: f64,
    pub bucket_tokens: f64,
    pub bucket_capacity: u64,
    /// Requests routed per second over the last tick.
    pub per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_count: u64,
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    pub wait_count: u64,
    /// The learned limit ([`crate::limiter::PacingView`]), key scope. Per-model limits
    /// (`limit_scope = "model"`) are not in the snapshot yet.
    pub pacing: PacingPanel,
    /// The shared budget (cluster mode); all zero when the provider paces alone.
    pub cluster: ClusterPanel,
    /// The token budget; all zero when the provider has none.
    pub tokens: TokenPanel,
    /// Oldest first; the first `Snapshot::history_len` points are valid.
    pub history: [Point; HISTORY],
}

/// A provider's learned limit at one tick; `NaN` means no value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq)]
pub struct PacingPanel {
    pub learned_rpm: f64,
    pub ceiling_rpm: f64,
    /// Sends per window: what the guard allows now, the learned limit, the ceiling.
    pub limit: u64,
    pub learned: u64,
    pub ceiling: u64,
    pub window_s: f64,
    /// Index into `Source::ALL`.
    pub source: u64,
    /// 0 or 1.
    pub probing: u64,
    /// Seconds until the next probe may start (0: now); `NaN`: nothing to probe.
    pub next_probe_s: f64,
    /// `PauseReason as u64`; 0 when admission is not paused.
    pub pause_reason: u64,
    /// Seconds left of the pause (0 when not paused).
    pub pause_s: f64,
    pub sent_in_window: u64,
    /// Limit changes since start.
    pub changes: u64,
}

/// A provider's shared budget at one tick ([`crate::budget::ClusterView`]), its numbers
/// only: the names (budget, replica, generation, source, pause reason) and the
/// per-replica shares vary in size, so the JSON reads them live when a frame is encoded.
/// `present` is 0 (and so is everything else) when the provider has no budget.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq)]
pub struct ClusterPanel {
    pub present: u64,
    /// Index into `Mode::ALL`.
    pub mode: u64,
    /// 0 or 1.
    pub backend_up: u64,
    pub replicas: u64,
    /// Sends per window: this replica's fallback share, and the shares reserved for
    /// replicas that vanished.
    pub fallback_limit: u64,
    pub reserved: u64,
    /// 0 or 1.
    pub learning: u64,
    /// The shared record; `record_version` 0: not read from Redis yet.
    pub record_version: u64,
    pub record_rate_rpm: f64,
    pub record_bucket_capacity: u64,
    pub record_window_s: f64,
    /// 0 or 1.
    pub record_fallback: u64,
    pub record_learned: u64,
    pub record_limit: u64,
    /// 0 or 1.
    pub record_probing: u64,
    pub record_rpm: f64,
    pub record_retreat_factor: f64,
    /// Lease calls by result, in `LeaseCounts::labelled` order.
    pub leases: [u64; 5],
    pub round_trips: u64,
    pub admitted: u64,
    /// Round trips to Redis since start; `NaN` before the first.
    pub round_trip_p50_ms: f64,
    pub round_trip_p99_ms: f64,
    /// Seconds Redis had not answered at its last failed call; `NaN` while it answers.
    pub down_for_s: f64,
}

/// A provider's token budget at one tick ([`crate::limiter::TokenView`], tokens per
/// provider window) and its token counts since start ([`crate::stats::TokenCounts`]).
/// `present` is 0 (and so is everything else) when the provider has no token budget.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq)]
pub struct TokenPanel {
    pub present: u64,
    /// Allowed now, and as configured.
    pub limit: u64,
    pub ceiling: u64,
    /// Stated by the provider; 0: not stated.
    pub stated: u64,
    /// Charged in the rolling window (reservations included), and what is left of the
    /// limit.
    pub charged: u64,
    pub remaining: u64,
    /// Estimated tokens of the requests parked in the queue.
    pub waiting: u64,
    /// Seconds left of a hold after a 429 about tokens (0: not held).
    pub held_s: f64,
    /// Totals since start: reported by the provider, estimated at admission, charged
    /// in the end.
    pub prompt: u64,
    pub completion: u64,
    pub estimated: u64,
    pub settled: u64,
    /// Requests refused because their estimate exceeds a whole window.
    pub refused_too_large: u64,
    /// Settlements with usage, and their mean `estimate ÷ actual`; `NaN` before the
    /// first.
    pub ratio_count: u64,
    pub ratio_mean: f64,
}

/// Everything the dashboard shows, at one tick.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Snapshot {
    /// Builds so far, this one included (1 for the first).
    pub build: u64,
    pub built_at_unix_ms: u64,
    pub uptime_ms: u64,
    pub tick_ms: u64,
    /// Panels filled (at most `MAX_PROVIDERS`).
    pub providers_len: u64,
    /// Providers configured.
    pub providers_total: u64,
    pub history_len: u64,
    /// The request ledger over every provider: requests accepted, ended by
    /// `Outcome as usize`, and in flight; `arrived = Σ outcomes + in_flight`.
    pub arrived: u64,
    pub outcomes: [u64; Outcome::ALL.len()],
    pub in_flight: u64,
    pub panels: [Panel; MAX_PROVIDERS],
}

impl Snapshot {
    pub fn panels(&self) -> &[Panel] {
        &self.panels[..(self.providers_len as usize).min(MAX_PROVIDERS)]
    }
}

/// Where snapshots are published and how readers hear about them.
#[derive(Debug)]
pub struct Hub {
    lock: SeqLock<Snapshot>,
    builds: AtomicU64,
    clients: AtomicU64,
    notify: watch::Sender<u64>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            lock: SeqLock::new(Snapshot::zeroed()),
            builds: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            notify: watch::Sender::new(0),
        }
    }
}

impl Hub {
    /// Publishes `snap` and wakes the streams. Only the publisher calls this.
    pub fn publish(&self, snap: &Snapshot) -> u64 {
        let seq = self.lock.publish(snap);
        // Relaxed: a statistic; the seqlock orders the data itself.
        self.builds.fetch_add(1, Ordering::Relaxed);
        self.notify.send_replace(seq);
        seq
    }

    /// Copies the latest snapshot into `out` (no allocation); returns its sequence.
    pub fn read_into(&self, out: &mut Snapshot) -> u64 {
        self.lock.read_into(out)
    }

    /// The sequence of the latest snapshot (0 before the first).
    pub fn sequence(&self) -> u64 {
        self.lock.sequence()
    }

    /// A receiver that wakes at each publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }

    /// Counts an open stream until the guard drops.
    pub fn client(self: &std::sync::Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(std::sync::Arc::clone(self))
    }
}

/// One open dashboard stream.
#[derive(Debug)]
pub struct ClientGuard(std::sync::Arc<Hub>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
