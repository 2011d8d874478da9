//! Log output: JSON lines (default) or a human format, at a level that can change at
//! run time through the returned handle.
//!
//! Per-request lines come from [`crate::record`]; nothing logged carries a key, a token
//! or an `Authorization` value (secrets are masked by their `Debug` impl and never
//! passed to a log macro).

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

use crate::config::LogFormat;

/// Changes the log level of a running process.
pub type LevelHandle = reload::Handle<LevelFilter, Registry>;

/// Installs the global subscriber; `Err` if one is already installed.
pub fn init(level: tracing::Level, format: LogFormat) -> Result<LevelHandle, String> {
    let (filter, handle) = reload::Layer::new(LevelFilter::from_level(level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(handle)
}
