//! What the simulated upstream counts, for its own `/mock/stats` endpoint and the tests.

use std::sync::atomic::AtomicU64;

/// Counters of the simulated upstream.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    /// Every 429 of a limit: a rolling window's or a full worker's.
    pub rate_limited: AtomicU64,
    /// 429s of a full worker (`--worker-limit`), also in `rate_limited`.
    pub worker_limited: AtomicU64,
    pub errors: AtomicU64,
    pub unauthorized: AtomicU64,
    pub streams: AtomicU64,
    /// 400s to `stream_options` (`x-mock-refuse-include-usage`, `--refuse-include-usage`).
    pub stream_options_refused: AtomicU64,
}
