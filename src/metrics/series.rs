//! What one request leaves behind in the metrics: latency in HDR histograms and one
//! count per (route, outcome), per provider.
//!
//! These are plain data structures with `&mut` methods; who owns them and how they
//! are merged is `metrics::Metrics`'s business.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::priority::Priority;

/// Which lane a request took to its provider, the `route` label of its series (the
/// discriminant indexes metric arrays). Not to be confused with [`crate::route`], which
/// picks the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Through the token bucket.
    Limited = 0,
    /// Unmetered, or to the fallback upstream.
    Passthrough = 1,
    /// Never sent upstream: refused before routing or at a full queue, abandoned before
    /// routing, or dropped, abandoned or cut while it waited in the queue. Its own series,
    /// so that a flood of sub-millisecond 429s does not pass for the limited route's
    /// latency.
    None = 2,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Limited, Lane::Passthrough, Lane::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Limited => "limited",
            Lane::Passthrough => "passthrough",
            Lane::None => "none",
        }
    }
}

/// How a request ended, as counted in `sidecar_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered below 400 and the whole body reached the client.
    Success,
    /// The upstream answered 4xx other than 429.
    ClientError,
    /// The upstream's 429 reached the client (retries spent or not allowed).
    Upstream429,
    /// Connect failure, timeout, 5xx, or a body cut mid-way.
    UpstreamError,
    /// Refused at once: the queue was full (429 from the sidecar).
    Rejected,
    /// Waited in the queue and gave up: low-priority deadline or request timeout.
    Dropped,
    /// The client went away first.
    ClientGone,
    /// Cut by the shutdown grace period.
    Shutdown,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Self::Success,
        Self::ClientError,
        Self::Upstream429,
        Self::UpstreamError,
        Self::Rejected,
        Self::Dropped,
        Self::ClientGone,
        Self::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::Upstream429 => "upstream_429",
            Self::UpstreamError => "upstream_error",
            Self::Rejected => "rejected",
            Self::Dropped => "dropped",
            Self::ClientGone => "client_gone",
            Self::Shutdown => "shutdown",
        }
    }
}

/// What went wrong upstream, as counted in `sidecar_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP or TLS connect failed.
    Connect,
    /// No response head before the request timeout.
    Timeout,
    /// The connection failed after the request was sent, before a response head.
    Request,
    /// The upstream answered 5xx.
    Status5xx,
    /// The body was cut mid-way.
    Stream,
    /// The body went silent for longer than the stream idle timeout.
    IdleTimeout,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        Self::Connect,
        Self::Timeout,
        Self::Request,
        Self::Status5xx,
        Self::Stream,
        Self::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Request => "request",
            Self::Status5xx => "status_5xx",
            Self::Stream => "stream",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// One finished request, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub route: Lane,
    pub outcome: Outcome,
    pub error: Option<ErrorKind>,
    pub priority: Priority,
    /// Sending upstream → the response head (absent when nothing was sent).
    pub upstream_latency: Option<Duration>,
    /// Arrival → the first body byte to the client.
    pub ttfb: Option<Duration>,
    /// Arrival → the last byte.
    pub duration: Duration,
    /// Time parked in the queue (limited route only).
    pub queue_wait: Option<Duration>,
}

/// A latency distribution: an HDR histogram in microseconds (two significant
/// digits: every value within 1%) plus the exact sum Prometheus wants.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
    sum_us: u64,
}

/// Prometheus bucket bounds, in seconds: sub-millisecond to ten minutes.
pub const BUCKETS: [f64; 20] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Longest value kept exactly: an hour (longer ones are counted as an hour).
pub(super) const MAX_US: u64 = 3_600_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self {
            // Auto-resizing: a histogram only grows to the largest value it has seen.
            hist: Histogram::new(2).expect("2 significant digits is a valid precision"),
            sum_us: 0,
        }
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        // `record` grows the auto-resizing histogram; `saturating_record` would not.
        if self.hist.record(us).is_err() {
            self.hist.saturating_record(us);
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Counts `n` values at `us` (at most [`MAX_US`]) without adding to the sum: what a
    /// collector takes from a worker's cells (see `cells`).
    pub(super) fn record_n_at(&mut self, us: u64, n: u64) {
        if self.hist.record_n(us, n).is_err() {
            self.hist.saturating_record_n(us, n);
        }
    }

    /// Adds `us` microseconds to the sum (see [`Latency::record_n_at`]).
    pub(super) fn add_sum_us(&mut self, us: u64) {
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    pub fn add(&mut self, other: &Latency) {
        if other.count() == 0 {
            return;
        }
        // Auto-resize makes `add` infallible for values this histogram cannot hold yet.
        let _ = self.hist.add(&other.hist);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    pub fn reset(&mut self) {
        if self.count() != 0 {
            self.hist.reset();
            self.sum_us = 0;
        }
    }

    /// The value at quantile `q`, in milliseconds; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        (self.count() > 0).then(|| self.hist.value_at_quantile(q) as f64 / 1e3)
    }

    /// Per-bucket counts for [`BUCKETS`] plus `+Inf` (not cumulative); see
    /// [`hdr_buckets`].
    pub fn buckets(&self) -> [(f64, u64); BUCKETS.len() + 1] {
        hdr_buckets(&self.hist, &BUCKETS)
    }
}

/// Per-bucket counts of `hist` (microseconds) for `bounds` (seconds, ascending) plus
/// `+Inf`, not cumulative. A value goes to the first bucket at or above the lowest value
/// it is equivalent to, so a bound may count a value up to 1% above it.
pub fn hdr_buckets<const N: usize, const M: usize>(
    hist: &Histogram<u64>,
    bounds: &[f64; N],
) -> [(f64, u64); M] {
    const { assert!(M == N + 1, "one bucket per bound plus +Inf") };
    let mut out = [(f64::INFINITY, 0); M];
    for (slot, bound) in out.iter_mut().zip(bounds) {
        slot.0 = *bound;
    }
    for v in hist.iter_recorded() {
        let us = hist.lowest_equivalent(v.value_iterated_to());
        let secs = us as f64 / 1e6;
        let i = bounds.partition_point(|&b| b < secs);
        out[i].1 += v.count_at_value();
    }
    out
}

/// Everything recorded for one provider.
#[derive(Debug, Clone, Default)]
pub struct ProviderSeries {
    pub upstream_latency: Latency,
    pub ttfb: Latency,
    /// By route (`Lane as usize`).
    pub duration: [Latency; Lane::ALL.len()],
    /// By priority (`Priority as usize`).
    pub queue_wait: [Latency; 3],
    /// `[route][outcome]`.
    pub requests: [[u64; Outcome::ALL.len()]; Lane::ALL.len()],
    pub errors: [u64; ErrorKind::ALL.len()],
}

impl ProviderSeries {
    pub fn record(&mut self, s: &Sample) {
        let route = s.route as usize;
        if let Some(d) = s.upstream_latency {
            self.upstream_latency.record(d);
        }
        if let Some(d) = s.ttfb {
            self.ttfb.record(d);
        }
        self.duration[route].record(s.duration);
        if let Some(d) = s.queue_wait {
            self.queue_wait[s.priority as usize].record(d);
        }
        self.requests[route][s.outcome as usize] += 1;
        if let Some(k) = s.error {
            self.errors[k as usize] += 1;
        }
    }

    pub fn add(&mut self, o: &ProviderSeries) {
        self.upstream_latency.add(&o.upstream_latency);
        self.ttfb.add(&o.ttfb);
        for (a, b) in self.duration.iter_mut().zip(&o.duration) {
            a.add(b);
        }
        for (a, b) in self.queue_wait.iter_mut().zip(&o.queue_wait) {
            a.add(b);
        }
        for (a, b) in self
            .requests
            .iter_mut()
            .flatten()
            .zip(o.requests.iter().flatten())
        {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(&o.errors) {
            *a += b;
        }
    }

    pub fn reset(&mut self) {
        self.upstream_latency.reset();
        self.ttfb.reset();
        self.duration.iter_mut().for_each(Latency::reset);
        self.queue_wait.iter_mut().for_each(Latency::reset);
        self.requests = Default::default();
        self.errors = Default::default();
    }

    pub fn requests_total(&self) -> u64 {
        self.requests.iter().flatten().sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_place_each_value_at_the_first_bound_at_or_above_it() {
        let mut l = Latency::default();
        for d in [
            Duration::from_micros(100),
            ms(1),
            ms(3),
            ms(3),
            Duration::from_secs(45),
            Duration::from_secs(7200),
        ] {
            l.record(d);
        }
        let b = l.buckets();
        let at = |bound: f64| b.iter().find(|(x, _)| *x == bound).unwrap().1;
        assert_eq!(at(0.000_25), 1);
        assert_eq!(at(0.001), 1);
        assert_eq!(at(0.005), 2);
        assert_eq!(at(60.0), 1);
        assert_eq!(
            b.last().unwrap(),
            &(f64::INFINITY, 1),
            "an hour is past 600 s"
        );
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 6);
        assert_eq!(l.count(), 6);
        let sum = 0.0001 + 0.001 + 0.006 + 45.0 + 3600.0;
        assert!((l.sum_seconds() - sum).abs() < 1e-6, "{}", l.sum_seconds());
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut l = Latency::default();
        for i in 1..=1000 {
            l.record(ms(i));
        }
        let p99 = l.quantile_ms(0.99).unwrap();
        assert!((p99 - 990.0).abs() / 990.0 < 0.01, "{p99}");
        assert_eq!(Latency::default().quantile_ms(0.5), None);
    }

    #[test]
    fn series_add_then_reset_moves_every_count() {
        let mut a = ProviderSeries::default();
        let s = Sample {
            route: Lane::Limited,
            outcome: Outcome::UpstreamError,
            error: Some(ErrorKind::Status5xx),
            priority: Priority::Low,
            upstream_latency: Some(ms(5)),
            ttfb: Some(ms(6)),
            duration: ms(7),
            queue_wait: Some(ms(1)),
        };
        a.record(&s);
        a.record(&Sample {
            route: Lane::Passthrough,
            outcome: Outcome::Success,
            error: None,
            queue_wait: None,
            ..s
        });
        a.record(&Sample {
            route: Lane::None,
            outcome: Outcome::Rejected,
            error: None,
            upstream_latency: None,
            ttfb: None,
            queue_wait: None,
            ..s
        });
        let mut total = ProviderSeries::default();
        total.add(&a);
        a.reset();
        assert_eq!(a.requests_total(), 0);
        assert_eq!(a.upstream_latency.count(), 0);
        assert_eq!(total.requests_total(), 3);
        assert_eq!(total.requests[0][Outcome::UpstreamError as usize], 1);
        assert_eq!(total.requests[1][Outcome::Success as usize], 1);
        assert_eq!(total.requests[2][Outcome::Rejected as usize], 1);
        assert_eq!(total.duration[2].count(), 1);
        assert_eq!(total.errors[ErrorKind::Status5xx as usize], 1);
        assert_eq!(total.queue_wait[Priority::Low as usize].count(), 1);
        assert_eq!(total.duration[1].count(), 1);
        assert_eq!(total.upstream_latency.count(), 2);
    }
}
