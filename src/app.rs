//! The application context: everything shared by all workers, built once at start-up.
//!
//! `App` owns the configuration, the providers (each with its own state), the router,
//! the clock and the shutdown signals. Workers hold it as `Arc<App>`; per-worker state
//! (the upstream pool) lives in the sidecar's `Worker`, never here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderValue;

use crate::clock::{MonotonicClock, SharedClock};
use crate::config::{Config, LimitScope, ProviderConfig};
use crate::hot::{Hot, HotConfig};
use crate::limiter::dispatch::Dispatcher;
use crate::limiter::{Limiter, Pacing, PacingView, QueueCounts, RetreatConfig, RetreatView};
use crate::logging::LevelHandle;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::server::Shutdown;
use crate::snapshot::Hub;
use crate::stats::{ProviderStats, StatsSnapshot};
use crate::upstream::{bearer, Connector};

/// One upstream provider and the state it owns.
/// The per-model corrections of a provider's token estimates. They may go down to half
/// the fixed ratio's estimate, not only up: `bytes_per_token` (3) over-counts most text
/// by a quarter to a half, and every token over-reserved while a request runs is one
/// the window does not fill (measured: 91 % of the limit filled at a fixed bytes / 3,
/// against a provider counting bytes / 4; 95 % and more once the estimate matches).
/// Learned from settled usage as mean + 2 deviations, an estimate stays above most of
/// what the provider counts; one that falls short is settled at the provider's count.
fn token_ratios() -> crate::tokens::RatioTable {
    use crate::tokens::{ratio::DEFAULT_MODELS, Factor, RatioRules, RatioTable};
    RatioTable::new(
        DEFAULT_MODELS,
        RatioRules {
            floor: Factor::from_scaled(Factor::SCALE / 2),
            ..RatioRules::default()
        },
    )
}

/// Most models remembered as refusing `stream_options` (names cut to 256 bytes).
pub const USAGE_REFUSED_KEPT: usize = 1024;

#[derive(Debug)]
pub struct Provider {
    /// Position in `App::providers` (and in `Hot::providers`).
    pub index: usize,
    pub name: Arc<str>,
    pub config: ProviderConfig,
    /// `Authorization` sent upstream (`None`: the client's passes through).
    pub auth_header: Option<HeaderValue>,
    /// `Host` sent upstream.
    pub host_header: HeaderValue,
    /// Admission control: bucket, queues, retreat.
    pub limiter: Arc<Limiter>,
    /// Cluster mode: the budget shared with other replicas through Redis.
    pub budget: Option<Arc<crate::budget::Budget>>,
    pub stats: ProviderStats,
    /// Per-model corrections of token estimates, learned from settled usage (`None`:
    /// no token budget).
    pub token_ratios: Option<crate::tokens::RatioTable>,
    /// Models that answered 400 to `stream_options` the sidecar added (`request_usage`):
    /// asked no more.
    usage_refused: dashmap::DashSet<String>,
    /// Clock time (+1, so 0 means never) of the last upstream answer below 500.
    last_success: AtomicU64,
}

impl Provider {
    pub fn new(
        index: usize,
        config: ProviderConfig,
        retreat: RetreatConfig,
        pacing: Pacing,
        now: u64,
    ) -> Self {
        Self::with_budget(index, config, retreat, pacing, now, None)
    }

    /// A provider whose limiter takes its tokens from `replica`'s share of a shared
    /// budget (`None`: alone).
    pub fn with_budget(
        index: usize,
        config: ProviderConfig,
        retreat: RetreatConfig,
        pacing: Pacing,
        now: u64,
        replica: Option<&Arc<str>>,
    ) -> Self {
        let name: Arc<str> = Arc::from(config.name.as_str());
        let budget = replica.map(|r| {
            Arc::new(crate::budget::Budget::new(
                Arc::clone(&name),
                index,
                &config.budget,
                Arc::clone(r),
            ))
        });
        Self {
            index,
            limiter: Arc::new({
                let l = Limiter::with_pacing(
                    config.rate_rpm,
                    config.bucket_capacity,
                    config.queue_max_size,
                    retreat,
                    Pacing {
                        window: config.window,
                        ..pacing
                    },
                    now,
                );
                let l = match &budget {
                    Some(b) => l.leased(b.pot()),
                    None => l,
                };
                // Before the model scopes: each model's limiter gets a budget of its own.
                let l = match config.tokens_per_window() {
                    Some(n) => l.with_token_budget(n),
                    None => l,
                };
                match config.limit_scope {
                    LimitScope::Key => l,
                    LimitScope::Model => l.model_scoped(crate::limiter::scopes::MAX_MODELS),
                }
            }),
            budget,
            stats: ProviderStats::default(),
            usage_refused: dashmap::DashSet::new(),
            token_ratios: config.tokens_per_window().map(|_| token_ratios()),
            name,
            auth_header: config.api_key.as_ref().and_then(bearer),
            host_header: HeaderValue::from_str(config.upstream.authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            config,
            last_success: AtomicU64::new(0),
        }
    }

    /// Whether `model` refused the `stream_options` the sidecar adds for usage.
    pub fn refuses_usage(&self, model: &str) -> bool {
        !self.usage_refused.is_empty() && self.usage_refused.contains(model)
    }

    /// `model` answered 400 to the `stream_options` the sidecar added: not asked again
    /// (at most [`USAGE_REFUSED_KEPT`] models are remembered).
    pub fn remember_usage_refused(&self, model: &str) {
        if self.usage_refused.len() < USAGE_REFUSED_KEPT {
            self.usage_refused.insert(model.to_owned());
        }
    }

    /// Notes that the upstream answered. Written at most every 100 ms so workers do not
    /// bounce the cache line on every request.
    pub fn mark_success(&self, now_nanos: u64) {
        // Relaxed: a freshness hint for readiness, ordered with nothing else.
        let last = self.last_success.load(Ordering::Relaxed);
        if last == 0 || now_nanos.saturating_add(1).saturating_sub(last) > 100_000_000 {
            self.last_success.store(now_nanos + 1, Ordering::Relaxed);
        }
    }

    /// Everything about this provider's admission, copied at `now_nanos`: the one
    /// accessor metrics and the dashboard read.
    pub fn snapshot(&self, now_nanos: u64) -> ProviderSnapshot {
        let (_, capacity) = self.limiter.bucket.rate();
        ProviderSnapshot {
            stats: self.stats.snapshot(),
            queue: self.limiter.queues.counts(),
            retreat: self.limiter.retreat_view(now_nanos),
            pacing: self.limiter.pacing_view(now_nanos),
            bucket_tokens: self.limiter.bucket.tokens(now_nanos).max(0.0),
            bucket_capacity: capacity,
        }
    }

    /// Whether the upstream answered within `window` before `now_nanos`.
    pub fn answered_within(&self, now_nanos: u64, window: Duration) -> bool {
        let last = self.last_success.load(Ordering::Relaxed);
        last != 0 && now_nanos.saturating_sub(last - 1) <= window.as_nanos() as u64
    }
}

/// Puts back the limits learned before a restart; a bad state file is logged and
/// ignored (the limits are learned again).
fn restore(providers: &[Provider], path: &std::path::Path, now: u64) {
    let saved = match crate::state_file::load(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "learned limits not restored");
            return;
        }
    };
    for p in providers {
        let models: std::collections::HashMap<String, u32> = saved
            .iter()
            .filter_map(|(k, e)| {
                let model = k
                    .strip_prefix(&*p.name)?
                    .strip_prefix(crate::state_file::MODEL_SEP)?;
                Some((model.to_owned(), e.learned_for(p.config.window)))
            })
            .collect();
        if !models.is_empty() {
            p.limiter.restore_models(models);
        }
        if let Some(entry) = saved.get(&*p.name) {
            let learned = entry.learned_for(p.config.window);
            if let Some(c) = p.limiter.restore(learned, now) {
                tracing::info!(
                    provider = &*p.name,
                    from = c.from,
                    to = c.to,
                    saved_source = %entry.source,
                    "learned limit restored from the state file"
                );
            }
        }
    }
}

/// A provider's counters, queue depths and retreat state at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProviderSnapshot {
    pub stats: StatsSnapshot,
    pub queue: QueueCounts,
    pub retreat: RetreatView,
    pub pacing: PacingView,
    pub bucket_tokens: f64,
    pub bucket_capacity: u32,
}

/// Admin API changes, for `sidecar_admin_changes_total{result}`.
#[derive(Debug, Default)]
pub struct AdminCounters {
    pub applied: AtomicU64,
    pub rejected: AtomicU64,
}

/// Everything the workers share.
pub struct App {
    pub config: Config,
    pub providers: Vec<Provider>,
    pub router: Router,
    pub clock: SharedClock,
    pub connector: Connector,
    pub shutdown: Shutdown,
    /// Random per process, the high half of generated request ids.
    pub boot_id: u64,
    /// Latency histograms and outcome counters, one shard per worker.
    pub metrics: Metrics,
    /// The dashboard snapshot and its readers.
    pub snapshots: Arc<Hub>,
    pub admin_changes: AdminCounters,
    /// When the app was built, for uptime.
    pub started: std::time::Instant,
    /// The settings that change at run time (admin API, SIGHUP).
    pub hot: HotConfig,
    /// Changes the log level; set by `main` once logging is installed.
    pub log_level: OnceLock<LevelHandle>,
    /// Who may use the admin API.
    pub admin: crate::auth::Mode,
    /// Some provider learns limits per model: every request's model is read.
    pub model_scoped: bool,
    /// Grants queued requests their tokens; stops when the app is dropped.
    _dispatcher: Option<Dispatcher>,
}

impl App {
    pub fn new(config: Config) -> Arc<Self> {
        Self::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    pub fn with_clock(config: Config, clock: SharedClock) -> Arc<Self> {
        let replica = config.redis.as_ref().map(|_| crate::budget::replica_id());
        let providers: Vec<Provider> = config
            .providers
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, p)| {
                let pacing = Pacing {
                    window: p.window,
                    margin: config.margin,
                    probe_interval: config.probe_interval,
                };
                Provider::with_budget(
                    i,
                    p,
                    config.retreat,
                    pacing,
                    clock.now_nanos(),
                    replica.as_ref(),
                )
            })
            .collect();
        let limiters = providers
            .iter()
            .map(|p| (Arc::clone(&p.name), Arc::clone(&p.limiter)))
            .collect();
        if let Some(path) = &config.state_file {
            restore(&providers, path, clock.now_nanos());
        }
        let dispatcher = match Dispatcher::spawn(
            limiters,
            Arc::clone(&clock),
            config.state_file.clone(),
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the dispatcher thread: queued requests will time out");
                None
            }
        };
        let router = Router::new(&config.providers, config.default_provider);
        let boot_id = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish()
        };
        let started = std::time::Instant::now();
        let model_scoped = providers.iter().any(|p| p.limiter.is_model_scoped());
        Arc::new(Self {
            model_scoped,
            metrics: Metrics::new(providers.len(), config.workers.get(), started),
            snapshots: Arc::new(Hub::default()),
            admin_changes: AdminCounters::default(),
            started,
            hot: HotConfig::new(Hot::of(&config)),
            log_level: OnceLock::new(),
            admin: crate::auth::Mode::new(
                config.admin_token.as_ref(),
                config.listen.ip(),
                config.admin_loopback_reads,
            ),
            connector: Connector::with_extra_roots(config.timeouts.connect, &config.upstream_ca),
            router,
            providers,
            clock,
            shutdown: Shutdown::default(),
            boot_id,
            config,
            _dispatcher: dispatcher,
        })
    }

    /// Provider names, in configuration order.
    pub fn provider_names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| &*p.name).collect()
    }

    pub fn default_provider(&self) -> &Provider {
        &self.providers[self.config.default_provider]
    }
}
