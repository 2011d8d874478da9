//! The settings an operator may change while the sidecar runs, as one immutable value
//! per version.
//!
//! The request path loads the current [`Hot`] once per request (an `ArcSwap` load: no
//! lock, no contention) and uses that value throughout, so a request sees one version
//! or the next, never half of a change. Changes (the admin API, SIGHUP) are
//! serialised by [`HotConfig::update`]: it validates the whole change first, pushes
//! rates and queue bounds into the providers' limiters, then swaps the value in.
//! Everything else in [`crate::config::Config`] needs a restart.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::config::{Config, ProviderConfig};

/// The per-provider settings that can change at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotProvider {
    pub rate_rpm: f64,
    pub bucket_capacity: u32,
    pub queue_max_size: usize,
    pub low_priority_timeout: Duration,
}

impl HotProvider {
    pub fn of(p: &ProviderConfig) -> Self {
        Self {
            rate_rpm: p.rate_rpm,
            bucket_capacity: p.bucket_capacity,
            queue_max_size: p.queue_max_size,
            low_priority_timeout: p.low_priority_timeout,
        }
    }
}

/// One version of the run-time settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Hot {
    /// Starts at 1; each applied change adds one.
    pub version: u64,
    pub request_timeout: Duration,
    pub fallback_enabled_passthrough: bool,
    pub log_level: tracing::Level,
    /// The global defaults, as last set (a global change applies to every provider).
    pub defaults: HotProvider,
    /// By provider index.
    pub providers: Vec<HotProvider>,
}

impl Hot {
    /// The start-up values. The global defaults start as the default provider's.
    pub fn of(config: &Config) -> Self {
        Self {
            version: 1,
            request_timeout: config.timeouts.request,
            fallback_enabled_passthrough: config.fallback_enabled_passthrough,
            log_level: config.log_level,
            defaults: HotProvider::of(config.default_provider()),
            providers: config.providers.iter().map(HotProvider::of).collect(),
        }
    }
}

/// The current [`Hot`] and the lock that serialises changes to it.
#[derive(Debug)]
pub struct HotConfig {
    current: ArcSwap<Hot>,
    writer: Mutex<()>,
}

impl HotConfig {
    pub fn new(hot: Hot) -> Self {
        Self {
            current: ArcSwap::from_pointee(hot),
            writer: Mutex::new(()),
        }
    }

    /// The current version, for one request's use.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Hot>> {
        self.current.load()
    }

    /// The current version, owned.
    pub fn get(&self) -> Arc<Hot> {
        self.current.load_full()
    }

    /// Runs `change` on the current value while holding the writer lock; if it returns
    /// a new value, `apply` pushes it into the running parts and it becomes current with
    /// the next version number. `change` sees the value that will be replaced, so a
    /// conditional change (`If-Match`) cannot race another writer.
    pub fn update<E>(
        &self,
        change: impl FnOnce(&Hot) -> Result<Hot, E>,
        apply: impl FnOnce(&Hot, &Hot),
    ) -> Result<(Arc<Hot>, Arc<Hot>), E> {
        let _w = self.writer.lock();
        let old = self.current.load_full();
        let mut new = change(&old)?;
        new.version = old.version + 1;
        apply(&old, &new);
        let new = Arc::new(new);
        self.current.store(Arc::clone(&new));
        Ok((old, new))
    }
}
