//! Learned limits kept across restarts (`state_file`), so a rolling deploy does not pay
//! for them again in 429s.
//!
//! A small JSON file, one entry per provider (and per model scope, keyed
//! `<provider> model=<model>`): the learned limit per window, the window
//! it was learned on and where it came from. Written whole to a temporary file beside
//! it and renamed over it, so a reader (or a crash) sees the old file or the new one,
//! never half of one. A limit learned on another window length is scaled to the new
//! one; a limit that was never learned (source `config`) is not kept. A missing file is
//! an empty state; an unreadable or malformed one is reported and ignored — start-up
//! never fails on it, the sidecar just learns again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One provider's learned limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Sends per window.
    pub learned: u32,
    pub window_secs: f64,
    /// `Source::as_str` of the limit when it was saved.
    pub source: String,
}

impl Entry {
    /// The limit for a window of `window` (scaled down, at least 1).
    pub fn learned_for(&self, window: Duration) -> u32 {
        if (self.window_secs - window.as_secs_f64()).abs() < 1e-9 || self.window_secs <= 0.0 {
            return self.learned.max(1);
        }
        let scaled = (f64::from(self.learned) * window.as_secs_f64() / self.window_secs).floor();
        if scaled.is_finite() && scaled >= 1.0 {
            scaled.min(u32::MAX as f64) as u32
        } else {
            1
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    providers: BTreeMap<String, Entry>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not a state file of this version: {reason}")]
    Malformed { path: String, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const VERSION: u32 = 1;

/// Between a provider's name and a model's in the key of a model scope's entry
/// (`nvidia model=meta/llama-3.1-8b-instruct`).
pub const MODEL_SEP: &str = " model=";

/// Reads the learned limits by provider name; a missing file is an empty state.
pub fn load(path: &Path) -> Result<BTreeMap<String, Entry>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StateError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let file: File = serde_json::from_str(&text).map_err(|e| StateError::Malformed {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if file.version != VERSION {
        return Err(StateError::Malformed {
            path: path.display().to_string(),
            reason: format!("version {} (expected {VERSION})", file.version),
        });
    }
    Ok(file.providers)
}

/// Writes the learned limits (replacing the file atomically).
pub fn save(path: &Path, providers: BTreeMap<String, Entry>) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = File {
        version: VERSION,
        providers,
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| err(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(learned: u32, window_secs: f64) -> Entry {
        Entry {
            learned,
            window_secs,
            source: "learned_429".into(),
        }
    }

    #[test]
    fn a_saved_state_loads_back_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load(&path).unwrap().is_empty());
        let mut m = BTreeMap::new();
        m.insert("nvidia".to_owned(), entry(48, 60.0));
        save(&path, m.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), m);
        assert!(
            !dir.path().join("state.json.tmp").exists(),
            "renamed into place"
        );
    }

    #[test]
    fn a_malformed_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        std::fs::write(&path, r#"{"version":9,"providers":{}}"#).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("version 9"));
    }

    #[test]
    fn a_limit_learned_on_another_window_is_scaled_down() {
        assert_eq!(entry(48, 60.0).learned_for(Duration::from_secs(60)), 48);
        assert_eq!(entry(48, 60.0).learned_for(Duration::from_secs(6)), 4);
        assert_eq!(entry(5, 6.0).learned_for(Duration::from_secs(60)), 50);
        assert_eq!(entry(3, 60.0).learned_for(Duration::from_secs(1)), 1);
    }
}
