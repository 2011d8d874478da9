//! Where raw environment values come from.
//!
//! Configuration reads variables through [`EnvSource`] so tests hand in a map instead of
//! mutating the process environment. In production the process environment wins over
//! a `.env` file in the working directory, as every dotenv tool does.

use std::collections::HashMap;
use std::path::Path;

/// A read-only view of environment variables.
pub trait EnvSource {
    fn var(&self, key: &str) -> Option<String>;
}

impl EnvSource for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// The process environment layered over an optional `.env` file.
#[derive(Debug, Default)]
pub struct ProcessEnv {
    dotenv: HashMap<String, String>,
}

impl ProcessEnv {
    /// Reads `.env` from `dir` if it exists; a malformed file is an error naming the line.
    pub fn with_dotenv(dir: &Path) -> Result<Self, super::ConfigError> {
        let path = dir.join(".env");
        let mut dotenv = HashMap::new();
        if path.is_file() {
            let iter = dotenvy::from_path_iter(&path).map_err(|e| super::ConfigError::DotEnv {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| super::ConfigError::DotEnv {
                    path: path.display().to_string(),
                    reason: e.to_string().replace('\n', "\\n"),
                })?;
                dotenv.insert(k, v);
            }
        }
        Ok(Self { dotenv })
    }
}

impl ProcessEnv {
    /// The `SIDECAR_*` variables set, each with where it was set: the process
    /// environment or the `.env` file (the environment wins when both set one).
    pub fn sidecar_names(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<(String, &'static str)> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("SIDECAR_"))
            .map(|k| (k, "environment"))
            .collect();
        for k in self.dotenv.keys().filter(|k| k.starts_with("SIDECAR_")) {
            if !out.iter().any(|(o, _)| o == k) {
                out.push((k.clone(), ".env"));
            }
        }
        out.sort();
        out
    }
}

impl EnvSource for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key)
            .ok()
            .or_else(|| self.dotenv.get(key).cloned())
    }
}
