//! Starts the shared budgets' tasks for an [`App`]: the one place that knows both, so
//! `budget` imports nothing of the program above it (a cluster change is applied
//! through the admin path, as a PATCH would be). The app is the tasks' run-time
//! [`budget::Settings`], held weakly: once the app is dropped the tasks end.

use std::sync::{Arc, Weak};

use crate::app::App;
use crate::budget::{self, Feed, Inputs, Runner, SharedSettings};
use crate::hot::Hot;

/// Starts the task of every provider with a shared budget (no Redis, or no budget: no
/// thread).
pub fn spawn_budgets(app: &Arc<App>) -> std::io::Result<Option<Runner>> {
    let Some(redis) = app.config.redis.clone() else {
        return Ok(None);
    };
    let feeds = app
        .providers
        .iter()
        .filter_map(|p| {
            Some(Feed {
                budget: Arc::clone(p.budget.as_ref()?),
                limiter: Arc::clone(&p.limiter),
                window: p.config.window,
            })
        })
        .collect();
    let settings: Weak<App> = Arc::downgrade(app);
    Runner::spawn(Inputs {
        feeds,
        redis,
        upstream_ca: app.config.upstream_ca.clone(),
        clock: Arc::clone(&app.clock),
        margin: app.config.margin,
        retreat: app.config.retreat,
        probe_interval: app.config.probe_interval,
        settings,
    })
}

impl budget::Settings for App {
    fn current(&self) -> Arc<Hot> {
        self.hot.get()
    }

    fn adopt(&self, index: usize, shared: SharedSettings) {
        crate::admin::apply_cluster(
            self,
            index,
            shared.rate_rpm,
            shared.bucket_capacity,
            shared.fallback,
            shared.tokens_per_minute,
        );
    }
}
