//! What one replica knows of its shared budget, copied for metrics, the snapshot, the
//! dashboard and the admin view.

use std::sync::Arc;
use std::time::Duration;

use crate::limiter::Mode;

/// The budget's shared record, as this replica last read it from Redis.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// Bumped by every change of a shared field.
    pub version: u64,
    pub rate_rpm: f64,
    pub bucket_capacity: u32,
    pub window: Duration,
    /// `fallback_enabled_passthrough` as the cluster has it.
    pub fallback: bool,
    /// Per window: the learned limit (0: none) and the limit kept now.
    pub learned: u32,
    pub limit: u32,
    /// Where the learned limit came from: config, header, learned_429 or probe.
    pub source: String,
    pub probing: bool,
    /// Requests per minute the cluster is paced at now (retreat included).
    pub rpm: f64,
    pub retreat_factor: f64,
    /// Redis milliseconds until which admission is paused (0: not paused), and why.
    pub pause_until_ms: u64,
    pub pause_reason: String,
    /// Limit changes the cluster has made (of requests and tokens).
    pub changes: u64,
    /// Per window: the configured token limit (0: no shared token budget) and the learned
    /// one (0: none).
    pub tokens_limit: u64,
    pub tokens_learned: u64,
    /// Where the learned token limit came from: config, header or tokens_429.
    pub tokens_source: String,
    /// Redis milliseconds until which token leases are held after a token 429 (past: none).
    pub tokens_hold_until_ms: u64,
    /// `tokens_per_minute` as configured for the cluster (`None`: the record has none,
    /// each replica keeps its own).
    pub tokens_per_minute: Option<u64>,
}

/// Lease round trips by result, since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCounts {
    /// All that was asked for.
    pub granted: u64,
    /// Less than asked for, but some.
    pub partial: u64,
    /// Nothing (the budget is spent for now, or paused).
    pub empty: u64,
    /// Unused tokens given back (counted in tokens, not round trips).
    pub returned: u64,
    /// The call failed or timed out.
    pub error: u64,
    /// Sends made after their lease's time (a busy machine between the grant and the
    /// write), counted again from their send.
    pub late: u64,
}

impl LeaseCounts {
    /// `(result label, value)` for `sidecar_budget_leases_total{result}`.
    pub fn labelled(&self) -> [(&'static str, u64); 5] {
        [
            ("granted", self.granted),
            ("partial", self.partial),
            ("empty", self.empty),
            ("returned", self.returned),
            ("error", self.error),
        ]
    }
}

/// One replica's view of its provider's shared budget.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// The budget's name (the provider's, unless `budget = "…"` renames it).
    pub budget: Arc<str>,
    /// This replica's id (host name and process id, or `SIDECAR_REPLICA_ID`).
    pub replica: Arc<str>,
    pub mode: Mode,
    /// Whether the last call to Redis succeeded.
    pub backend_up: bool,
    /// Replicas that heartbeated within the last 3 seconds (this one included).
    pub replicas: u32,
    /// Each live replica's grants in the shared window, by replica id.
    pub shares: Vec<(Arc<str>, u32)>,
    /// Per window: what this replica may send alone while Redis is lost.
    pub fallback_limit: u32,
    /// Per window: shares reserved for replicas that vanished but may still be sending.
    pub reserved: u32,
    pub record: Record,
    /// The budget's generation (a new one after Redis lost the state).
    pub generation: String,
    /// The first window of a generation: each replica at most its share.
    pub learning: bool,
    pub leases: LeaseCounts,
    /// Token leases (the shared token budget), by result; `returned` in tokens.
    pub token_leases: LeaseCounts,
    /// Script calls made to Redis, since start.
    pub round_trips: u64,
    /// Requests this replica admitted with leased tokens, since start (as of the last
    /// Redis call).
    pub admitted: u64,
    /// Seconds since Redis last answered (`None`: it has answered the last call).
    pub down_for: Option<Duration>,
}

impl ClusterView {
    pub fn new(budget: Arc<str>, replica: Arc<str>) -> Self {
        Self {
            budget,
            replica,
            mode: Mode::Fallback,
            backend_up: false,
            replicas: 0,
            shares: Vec::new(),
            fallback_limit: 0,
            reserved: 0,
            record: Record::default(),
            generation: String::new(),
            learning: false,
            leases: LeaseCounts::default(),
            token_leases: LeaseCounts::default(),
            round_trips: 0,
            admitted: 0,
            down_for: None,
        }
    }

    /// This replica's part of the cluster's grants in the window (0 to 1).
    pub fn own_share(&self) -> f64 {
        let total: u64 = self.shares.iter().map(|(_, n)| u64::from(*n)).sum();
        let own = self
            .shares
            .iter()
            .find(|(r, _)| *r == self.replica)
            .map_or(0, |(_, n)| u64::from(*n));
        if total == 0 {
            0.0
        } else {
            own as f64 / total as f64
        }
    }
}
