//! Where each setting's value came from, so an error names it the way the user wrote it.
//!
//! Validation speaks of settings by key (`rate_rpm`, `providers[1].rate_rpm`). A user who
//! set `SIDECAR_RATE_RPM` in a `.env` file, or `--rate-rpm` on the command line, looks for
//! that spelling, so [`Origins::name`] turns a key back into what the highest layer that
//! set it calls it: the variable (and the `.env` file it came from), the flag, or the
//! TOML key with its file and line.

use std::collections::HashMap;

use super::error::ConfigError;
use super::file::FileConfig;
use super::settings::{Settings, SETTINGS};
use super::source::EnvSource;

/// Where one value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A key of the TOML file, at this 1-based line.
    File { path: String, line: usize },
    /// A variable; `from` is `None` for the process environment, else the `.env` file.
    Env {
        var: &'static str,
        from: Option<String>,
    },
    /// A command-line flag.
    Flag { flag: String },
}

/// The origin of every setting, by key.
#[derive(Debug, Default)]
pub struct Origins {
    by_key: HashMap<String, Origin>,
    /// Every variable of a setting that is set, with the `.env` file it came from.
    vars: HashMap<&'static str, Option<String>>,
}

impl Origins {
    /// Layers as [`super::from_file`] merges them: file < environment < flags.
    pub fn new(file: &FileConfig, env: &dyn EnvSource, flags: &Settings) -> Self {
        let mut by_key = HashMap::new();
        let mut vars = HashMap::new();
        let set_flags = flags.set_keys();
        for s in SETTINGS {
            if env.var(s.env).is_some() {
                vars.insert(s.env, env.file_of(s.env));
            }
            let origin = if set_flags.contains(&s.key) {
                Origin::Flag {
                    flag: format!("--{}", s.key.replace('_', "-")),
                }
            } else if let Some(from) = vars.get(s.env) {
                Origin::Env {
                    var: s.env,
                    from: from.clone(),
                }
            } else if let Some(line) = file.lines.get(s.key) {
                Origin::File {
                    path: file.path.clone(),
                    line: *line,
                }
            } else {
                Origin::Default
            };
            by_key.insert(s.key.to_owned(), origin);
        }
        for (key, line) in file.lines.iter().filter(|(k, _)| k.contains('.')) {
            let origin = Origin::File {
                path: file.path.clone(),
                line: *line,
            };
            by_key.insert(key.clone(), origin);
        }
        Self { by_key, vars }
    }

    /// The origin of `setting`: a key, or a provider's key (`providers[i].key`, which
    /// falls back to the global key it inherits when the provider does not set it).
    pub fn of(&self, setting: &str) -> Option<&Origin> {
        if let Some(o) = self.by_key.get(setting) {
            return Some(o);
        }
        let (_, inherited) = setting.split_once("].")?;
        self.by_key.get(inherited)
    }

    /// `setting` (a key or a variable) as the user wrote it, and where it was written
    /// when the name does not say it all.
    pub fn name(&self, setting: &str) -> (String, String) {
        if let Some((var, from)) = self.vars.get_key_value(setting) {
            let at = from
                .as_ref()
                .map_or_else(String::new, |path| format!(" (set in {path})"));
            return ((*var).to_owned(), at);
        }
        match self.of(setting) {
            Some(Origin::Flag { flag }) => (flag.clone(), String::new()),
            Some(Origin::Env { var, from: None }) => ((*var).to_owned(), String::new()),
            Some(Origin::Env {
                var,
                from: Some(path),
            }) => ((*var).to_owned(), format!(" (set in {path})")),
            Some(Origin::File { path, line }) => {
                let key = match self.by_key.contains_key(setting) {
                    true => setting,
                    // Inherited by a provider from the top-level key of the same name.
                    false => setting.split_once("].").map_or(setting, |(_, k)| k),
                };
                (key.to_owned(), format!(" ({path} line {line})"))
            }
            Some(Origin::Default) | None => (setting.to_owned(), String::new()),
        }
    }

    /// `error` with its setting named as the user wrote it (see [`Origins::name`]).
    pub fn rename(&self, mut error: ConfigError) -> ConfigError {
        match &mut error {
            ConfigError::Invalid { setting, at, .. } if at.is_empty() => {
                (*setting, *at) = self.name(setting);
                error
            }
            _ => error,
        }
    }
}
