//! What the budget tasks take from the program that runs them.
//!
//! Values where a value will do: each provider's budget handle, its limiter and window
//! ([`Feed`]); the clock; the Redis settings; the fixed settings a replica announces when
//! it joins. The one live link is [`Settings`]: the run-time settings the tasks read
//! (the provider's rate and capacity, the fallback switch) and overwrite with the
//! cluster's. It is held weakly: once its owner is gone every task ends at its next
//! wake-up, without leaving the cluster (Redis forgets a silent replica by itself).

use std::sync::{Arc, Weak};
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::handle::Budget;
use super::view::Record;
use crate::clock::SharedClock;
use crate::config::RedisConfig;
use crate::hot::Hot;
use crate::limiter::{Limiter, Margin, RetreatConfig};

/// Everything [`super::Runner::spawn`] needs to run the budgets' tasks.
pub struct Inputs {
    /// One per provider with a shared budget.
    pub feeds: Vec<Feed>,
    pub redis: RedisConfig,
    /// Extra CA certificates (`upstream_ca_file`), also trusted for `rediss://`.
    pub upstream_ca: Vec<CertificateDer<'static>>,
    pub clock: SharedClock,
    /// The guard's margin, announced with the window when joining.
    pub margin: Margin,
    /// Retreat tuning, announced when joining.
    pub retreat: RetreatConfig,
    /// Probe interval, announced when joining.
    pub probe_interval: Duration,
    /// The run-time settings; the tasks end once they can no longer be upgraded.
    pub settings: Weak<dyn Settings>,
}

/// One provider's budget and the limiter its pot feeds.
pub struct Feed {
    pub budget: Arc<Budget>,
    pub limiter: Arc<Limiter>,
    /// The provider's configured window (the cluster's record may say another).
    pub window: Duration,
}

/// This replica's run-time settings, as the budget tasks read and change them.
pub trait Settings: Send + Sync {
    /// The current version.
    fn current(&self) -> Arc<Hot>;
    /// Makes the cluster's values provider `index`'s (and the fallback switch this
    /// replica's), as an admin change would.
    fn adopt(&self, index: usize, shared: SharedSettings);
}

/// The run-time settings a budget shares across its replicas: the cluster's record
/// carries them and every replica takes them as its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedSettings {
    pub rate_rpm: f64,
    pub bucket_capacity: u32,
    pub fallback: bool,
    /// `None`: the cluster's record has no token setting (each replica keeps its own).
    pub tokens_per_minute: Option<u64>,
}

impl SharedSettings {
    /// Provider `index`'s values in `hot`.
    pub fn local(hot: &Hot, index: usize) -> Self {
        let h = &hot.providers[index];
        Self {
            rate_rpm: h.rate_rpm,
            bucket_capacity: h.bucket_capacity,
            fallback: hot.fallback_enabled_passthrough,
            tokens_per_minute: Some(h.tokens_per_minute),
        }
    }

    /// The values in the cluster's record.
    pub fn of(record: &Record) -> Self {
        Self {
            rate_rpm: record.rate_rpm,
            bucket_capacity: record.bucket_capacity,
            fallback: record.fallback,
            tokens_per_minute: record.tokens_per_minute,
        }
    }
}
