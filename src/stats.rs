//! Per-provider request counters, in atomics, with one accessor that copies them.
//!
//! Counters only go up (depths live in the queues, with their own guards). Each is a
//! relaxed `fetch_add`: they order nothing and are read as a whole only by the
//! snapshot and metrics code.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// A provider's counters.
        #[derive(Debug, Default)]
        pub struct ProviderStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// The counters, copied at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl ProviderStats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Requests routed to this provider.
    total,
    /// Admitted through the token bucket (the limited route).
    limited,
    /// Sent unmetered or to the fallback upstream (the passthrough route).
    passthrough,
    /// Refused because the queue was full (429 to the client).
    rate_limited,
    /// Queue-full events (refused or sent to passthrough).
    queue_full,
    /// Low-priority requests dropped at their deadline (503).
    dropped_low_priority,
    /// Requests whose wait hit the request timeout (504).
    dropped_timeout,
    /// 429 answers from the upstream.
    upstream_429,
    /// Requests retried after an upstream 429.
    retries,
}

impl ProviderStats {
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
