//! Per-provider request counters, in atomics, with one accessor that copies them.
//!
//! Counters only go up (depths live in the queues, with their own guards). Each is a
//! relaxed `fetch_add`: they order nothing and are read as a whole only by the
//! snapshot and metrics code. The token budget's counts are [`tokens`]'s.

pub mod tokens;

use std::sync::atomic::{AtomicU64, Ordering};

pub use tokens::{TokenCounts, TokenStats};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// A provider's counters.
        #[derive(Debug, Default)]
        pub struct ProviderStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// The token budget's counts ([`ProviderStats::settle_tokens`]).
            pub tokens: TokenStats,
        }

        /// The counters, copied at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
            pub tokens: TokenCounts,
        }

        impl ProviderStats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    tokens: self.tokens.snapshot(),
                }
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
    /// Refused at once because their token estimate exceeds the whole budget of a
    /// window (issue 19).
    refused_tokens_too_large,
}

impl ProviderStats {
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request's token reservation as it is settled (once per request that
    /// had one): `estimate` reserved at admission, `settled` charged in the end, and the
    /// provider's `usage` as `(prompt, completion)` when it reported one, which also
    /// observes the estimate error `estimate ÷ (prompt + completion)` (unless that is
    /// 0). Lock-free and allocation-free: relaxed `fetch_add`s only.
    #[inline]
    pub fn settle_tokens(&self, estimate: u64, settled: u64, usage: Option<(u64, u64)>) {
        self.tokens.settle(estimate, settled, usage);
    }

    /// Counts a request refused because its token estimate exceeds the whole budget of
    /// a window.
    #[inline]
    pub fn refuse_tokens_too_large(&self) {
        Self::inc(&self.refused_tokens_too_large);
    }
}
