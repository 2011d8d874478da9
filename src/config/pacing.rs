//! The steps that check how the providers are paced: retreat and recovery, the window
//! guard's margin, 429 retries, where learned limits are kept, and client priorities.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::limiter::{Margin, RetreatConfig};
use crate::priority::Priority;

use super::error::ConfigError;
use super::secret::mask;
use super::settings::Merged;
use super::validate::{count_in, fraction, seconds, seconds_in, Range};

/// Retreat after refusals that teach nothing about the limit, and recovery after.
pub fn retreat(s: &Merged) -> Result<RetreatConfig, ConfigError> {
    Ok(RetreatConfig {
        decrease_factor: fraction("retreat_factor", s.retreat_factor, true)?,
        floor_fraction: fraction("retreat_floor", s.retreat_floor, false)?,
        quiet_period: seconds("retreat_quiet_period", s.retreat_quiet_period)?,
        recovery_step: fraction("recovery_step", s.recovery_step, false)?,
        recovery_interval: seconds("recovery_interval", s.recovery_interval)?,
        default_pause: seconds("retreat_default_pause", s.retreat_default_pause)?,
    })
}

/// Re-queues of a request the upstream answered 429.
pub fn upstream_429_retries(s: &Merged) -> Result<u32, ConfigError> {
    count_in(
        "upstream_429_retries",
        s.upstream_429_retries,
        Range::Integer { min: 0, max: 100 },
    )
}

/// Client bearer token → default priority; an error shows the token masked.
pub fn client_priorities(
    given: &BTreeMap<String, String>,
) -> Result<HashMap<String, Priority>, ConfigError> {
    let mut out = HashMap::new();
    for (key, value) in given {
        let p = Priority::parse(value.as_bytes()).map_err(|_| {
            ConfigError::invalid(
                format!("client_priorities[{:?}]", mask(key)),
                value,
                "high, normal or low (or 0, 1, 2)",
            )
        })?;
        out.insert(key.clone(), p);
    }
    Ok(out)
}

/// The window guard's safety margin.
pub fn margin(s: &Merged) -> Result<Margin, ConfigError> {
    let fraction = s.window_margin;
    if !(fraction.is_finite() && (0.0..0.5).contains(&fraction)) {
        return Err(ConfigError::invalid(
            "window_margin",
            fraction,
            "a fraction from 0 to less than 0.5 of the provider window",
        ));
    }
    let floor = seconds_in(
        "window_margin_floor",
        s.window_margin_floor,
        Range::Seconds {
            min: 0.0,
            max: 60.0,
        },
    )?;
    Ok(Margin { fraction, floor })
}

/// Where learned limits are kept across restarts (`None`: not kept).
pub fn state_file(s: &Merged) -> Result<Option<PathBuf>, ConfigError> {
    let path = s.state_file.trim();
    if path.is_empty() {
        return Ok(None);
    }
    let p = PathBuf::from(path);
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
    if dir.is_some_and(|d| !d.is_dir()) || p.is_dir() {
        return Err(ConfigError::invalid(
            "state_file",
            path,
            "a file path in an existing directory (the file is created when a limit is learned)",
        ));
    }
    Ok(Some(p))
}
