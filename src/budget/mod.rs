//! The shared budget: one provider limit paced across replicas through Redis.
//!
//! Replicas that use the same Redis and budget name share the provider's rate, window
//! guard, learned limit and retreat. The state lives in Redis and changes only through one
//! Lua script (`budget.lua`), so every decision is atomic and made on Redis's clock. The
//! request path never waits on Redis: it takes tokens from a local pot
//! ([`crate::limiter::LeasePot`]) that a task on the `budget` thread keeps filled with
//! leases sized to the rate (one token at 40 RPM; a fraction of a second's worth at high
//! rates). A grant counts in the shared window log from its grant until its lease time,
//! the window and the margin have passed, so in steady state the cluster never sends
//! more than the limit in any window.
//!
//! When Redis is lost the replica falls back to the limit divided by the replicas it last
//! saw (its local bucket and guard), and after `redis_fallback_for` stops sending with the
//! shared key, while Redis keeps that long a vanished replica's share reserved. A Redis
//! that lost its state starts a new generation: one window of learning mode in which each
//! replica first reports its own recent sends and then takes at most its share.
//!
//! Why redis-rs: it is the most used Rust client, maintained under the redis-rs
//! organisation, with a tokio connection manager that reconnects by itself, response and
//! connection timeouts, rustls TLS, and [`redis::Script`], which reloads a script on
//! NOSCRIPT. fred would do as well; redis-rs needs fewer dependencies here.

mod conn;
pub mod script;
mod task;
pub mod view;

use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_queue::SegQueue;
use parking_lot::Mutex;

use crate::app::App;
use crate::config::RedisConfig;
use crate::limiter::LeasePot;
pub use view::{ClusterView, LeaseCounts, Record};

/// A change made at this replica, for every replica of the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    Configure {
        rate_rpm: f64,
        bucket_capacity: u32,
        fallback: bool,
    },
    Forget,
}

/// One provider's shared budget, as this replica holds it.
#[derive(Debug)]
pub struct Budget {
    pub provider: Arc<str>,
    /// Position of the provider in `App::providers`.
    pub index: usize,
    pot: Arc<LeasePot>,
    view: Mutex<ClusterView>,
    /// Script round trips, in microseconds.
    round_trip: Mutex<hdrhistogram::Histogram<u64>>,
    commands: SegQueue<Command>,
}

impl Budget {
    pub fn new(provider: Arc<str>, index: usize, budget: &str, replica: Arc<str>) -> Self {
        Self {
            provider,
            index,
            pot: Arc::new(LeasePot::new()),
            view: Mutex::new(ClusterView::new(Arc::from(budget), replica)),
            round_trip: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
                    .expect("valid histogram bounds"),
            ),
            commands: SegQueue::new(),
        }
    }

    /// The pot the provider's limiter takes tokens from.
    pub fn pot(&self) -> Arc<LeasePot> {
        Arc::clone(&self.pot)
    }

    /// What this replica knows of the budget now.
    pub fn view(&self) -> ClusterView {
        self.view.lock().clone()
    }

    /// The round trips so far (microseconds).
    pub fn round_trips(&self) -> hdrhistogram::Histogram<u64> {
        self.round_trip.lock().clone()
    }

    /// Sends a change to every replica of the budget (through Redis).
    pub fn command(&self, c: Command) {
        self.commands.push(c);
        self.pot.wake();
    }

    fn update(&self, f: impl FnOnce(&mut ClusterView)) {
        f(&mut self.view.lock());
    }

    fn record_round_trip(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self.round_trip.lock().record(us.min(60_000_000));
    }
}

/// This replica's id in the shared budget: host name, process id and a random part (so a
/// restarted process is a new replica), without the separators the script uses.
pub fn replica_id() -> Arc<str> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "sidecar".to_owned());
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    Arc::from(format!(
        "{clean}-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    ))
}

/// The thread that runs every budget's task; stops when the app is dropped or
/// [`Runner::stop`] is called.
#[derive(Debug)]
pub struct Runner {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Runner {
    /// Starts the tasks of `app`'s shared budgets (none: no thread).
    pub fn spawn(app: &Arc<App>) -> std::io::Result<Option<Self>> {
        let Some(redis) = app.config.redis.clone() else {
            return Ok(None);
        };
        let budgets: Vec<Arc<Budget>> = app
            .providers
            .iter()
            .filter_map(|p| p.budget.clone())
            .collect();
        if budgets.is_empty() {
            return Ok(None);
        }
        let weak = Arc::downgrade(app);
        let stop = tokio_util::sync::CancellationToken::new();
        let shutdown = stop.clone();
        let thread = std::thread::Builder::new()
            .name("budget".into())
            .spawn(move || run(weak, budgets, redis, shutdown))?;
        Ok(Some(Self {
            thread: Some(thread),
            stop,
        }))
    }

    /// Gives back the tokens in hand and leaves the cluster (each call bounded by
    /// `redis_timeout`), then ends the thread.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    app: Weak<App>,
    budgets: Vec<Arc<Budget>>,
    redis: RedisConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the shared budget's runtime: replicas stay on their fallback share");
            return;
        }
    };
    rt.block_on(async move {
        let upstream_ca = app
            .upgrade()
            .map(|a| a.config.upstream_ca.clone())
            .unwrap_or_default();
        let conn = match conn::Conn::new(&redis, &upstream_ca) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(url = redis.url.masked(), error = %conn::masked(&e, &redis), "cannot use the Redis URL: replicas stay on their fallback share");
                return;
            }
        };
        let mut set = tokio::task::JoinSet::new();
        for b in budgets {
            let t = task::Task::new(Weak::clone(&app), b, conn.clone(), &redis);
            set.spawn(t.run(shutdown.clone()));
        }
        while set.join_next().await.is_some() {}
    });
}
