//! The process's life once the configuration is loaded: start, say what runs, wait for
//! a signal (SIGHUP reloads the run-time settings), drain, stop.

use std::sync::Arc;

use crate::app::App;
use crate::config::{Config, ConfigError};

use super::budgets::spawn_budgets;
use super::start::{start, ListenError, Running};

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not start; `settings` names what made its address, as written.
    #[error("{source} (set by {settings})")]
    Listen {
        #[source]
        source: ListenError,
        settings: String,
    },
    #[error("cannot start the shared budget thread: {0}")]
    BudgetThread(#[source] std::io::Error),
}

/// Runs the sidecar on `rt` until SIGTERM or SIGINT, then drains. On SIGHUP, `reload`
/// reads the configuration again and its run-time settings are applied (a bad file
/// keeps the running configuration).
pub fn run(
    app: Arc<App>,
    rt: &tokio::runtime::Runtime,
    reload: impl Fn() -> Result<Config, ConfigError>,
) -> Result<(), RunError> {
    let running = start(Arc::clone(&app)).map_err(|source| {
        // Name the settings that made the address, as the user wrote them.
        let settings = source
            .listener
            .settings()
            .iter()
            .map(|key| {
                let (name, at) = app.config.origins.name(key);
                format!("{name}{at}")
            })
            .collect::<Vec<_>>()
            .join(" and ");
        RunError::Listen { source, settings }
    })?;
    log_start(&app, &running);
    let budgets = spawn_budgets(&app).map_err(RunError::BudgetThread)?;
    if let Some(redis) = &app.config.redis {
        tracing::info!(
            redis = redis.url.masked(),
            prefix = %redis.prefix,
            budgets = app.providers.iter().map(|p| p.config.budget.as_str()).collect::<Vec<_>>().join(","),
            "shared budget: pacing with the other replicas through Redis"
        );
    }
    match &app.admin {
        mode if mode.is_off() => {
            tracing::warn!(admin = app.admin.describe(), "admin API is off")
        }
        mode => tracing::info!(admin = mode.describe(), "admin API"),
    }
    rt.block_on(serve_signals(&app, &reload));
    tracing::info!(
        grace_secs = app.config.timeouts.shutdown_grace.as_secs_f64(),
        "shutting down: draining connections"
    );
    running.stop();
    if let Some(b) = budgets {
        b.stop();
    }
    tracing::info!("stopped");
    Ok(())
}

fn log_start(app: &App, running: &Running) {
    tracing::info!(
        listen = %running.local_addr,
        workers = app.config.workers.get(),
        providers = app.providers.len(),
        "nvidia-sidecar listening"
    );
    for p in &app.providers {
        tracing::info!(
            provider = &*p.name,
            upstream = %p.config.upstream.display(),
            api_key = p.config.api_key.as_ref().map_or_else(|| "none (the client's passes through)".to_owned(), |k| k.masked()),
            rate_rpm = p.config.rate_rpm,
            window_secs = p.config.window.as_secs_f64(),
            models = p.config.models.join(","),
            "provider"
        );
    }
    tracing::info!(metrics = %running.metrics_addr, "metrics listening");
}

/// Waits for SIGTERM or SIGINT; on each SIGHUP re-reads the file and environment and
/// applies the run-time settings.
async fn serve_signals(app: &App, reload: &impl Fn() -> Result<Config, ConfigError>) {
    use tokio::signal::unix::{signal as unix_signal, SignalKind};
    let Ok(mut hup) = unix_signal(SignalKind::hangup()) else {
        return signal().await;
    };
    let stop = signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = hup.recv() => match reload() {
                Err(e) => tracing::error!(error = %e, "reload failed: the running configuration is kept"),
                Ok(config) => match crate::admin::reload(app, &config) {
                    Ok(changes) => tracing::info!(changed = changes.len(), "reloaded the configuration"),
                    Err(e) => tracing::error!(error = %e, "reload refused: the running configuration is kept"),
                },
            },
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C where those cannot be installed).
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
