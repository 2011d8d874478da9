//! Log output: JSON lines (default) or a human format, at a level that can change at
//! run time through the returned handle.
//!
//! Per-request lines come from [`crate::record`]; nothing logged carries a key, a token
//! or an `Authorization` value (secrets are masked by their `Debug` impl and never
//! passed to a log macro). Lines go through `tracing_appender::non_blocking`: a worker
//! hands each line to a lock-free channel and a writer thread does the `write(2)`, so
//! logging takes neither stderr's lock nor a syscall on the request path. Past its
//! buffer the channel drops lines (counted by the appender) rather than stall requests.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

use crate::config::LogFormat;

/// Changes the log level of a running process (see [`set_level`]).
pub type LevelHandle = reload::Handle<Targets, Registry>;

/// Where audit lines go: always logged at info, whatever the level, so lowering the
/// level through the admin API never hides the record of that change or later ones.
pub const AUDIT_TARGET: &str = "nvidia_sidecar::audit";

/// The filter for `level`: that level everywhere, audit lines always.
fn filter(level: tracing::Level) -> Targets {
    Targets::new()
        .with_default(LevelFilter::from_level(level))
        .with_target(
            AUDIT_TARGET,
            LevelFilter::from_level(level.max(tracing::Level::INFO)),
        )
}

/// Changes the level of a running process.
pub fn set_level(handle: &LevelHandle, level: tracing::Level) -> Result<(), String> {
    handle
        .modify(|f| *f = filter(level))
        .map_err(|e| e.to_string())
}

/// Keeps the log writer thread alive; dropping it flushes what is buffered.
pub type FlushGuard = tracing_appender::non_blocking::WorkerGuard;

/// Installs the global subscriber; `Err` if one is already installed.
pub fn init(level: tracing::Level, format: LogFormat) -> Result<(LevelHandle, FlushGuard), String> {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let (filter, handle) = reload::Layer::new(filter(level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().with_writer(writer)).try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok((handle, guard))
}
