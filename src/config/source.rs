//! Where raw environment values come from.
//!
//! Configuration reads variables through [`EnvSource`] so tests hand in a map instead of
//! mutating the process environment. In production the process environment wins over
//! a `.env` file in the working directory, as every dotenv tool does.

use std::collections::HashMap;
use std::path::Path;

use super::error::ConfigError;

/// A read-only view of environment variables.
pub trait EnvSource {
    fn var(&self, key: &str) -> Option<String>;

    /// The file a set variable came from (`None`: the process environment).
    fn file_of(&self, _key: &str) -> Option<String> {
        None
    }
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
    /// The `.env` file read, for errors naming where a variable was set.
    path: String,
}

impl ProcessEnv {
    /// Reads `.env` from `dir` if it exists; a malformed file is an error naming the line.
    pub fn with_dotenv(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(".env");
        let mut dotenv = HashMap::new();
        if path.is_file() {
            let malformed = |source| ConfigError::DotEnv {
                path: path.display().to_string(),
                source,
            };
            for item in dotenvy::from_path_iter(&path).map_err(malformed)? {
                let (k, v) = item.map_err(malformed)?;
                dotenv.insert(k, v);
            }
        }
        Ok(Self {
            dotenv,
            path: path.display().to_string(),
        })
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

    fn file_of(&self, key: &str) -> Option<String> {
        (std::env::var_os(key).is_none() && self.dotenv.contains_key(key))
            .then(|| self.path.clone())
    }
}
