//! The one error of configuration: a line that names the setting, the value and what is
//! accepted, or says which file could not be read or parsed, and why.

/// A configuration error: one line, naming the setting, the value and what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {setting}={value:?}{at}: expected {expected}{}", because(.source.as_ref()))]
    Invalid {
        /// The setting as the user wrote it: a key, a variable or a flag.
        setting: String,
        value: String,
        expected: String,
        /// Where it was written, when the name does not say (" (app.toml line 3)").
        at: String,
        /// Why a file the setting names could not be read.
        #[source]
        source: Option<Cause>,
    },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path} (line {line}): {message}")]
    Toml {
        path: String,
        line: usize,
        /// The parser's complaint on one line, an unknown key with the closest known one.
        message: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid .env file {path}: {}", one_line(.source))]
    DotEnv {
        path: String,
        #[source]
        source: dotenvy::Error,
    },
}

impl ConfigError {
    pub fn invalid(setting: impl Into<String>, value: impl ToString, expected: &str) -> Self {
        Self::invalid_because(setting.into(), value.to_string(), expected, None)
    }

    /// A setting that names a file which could not be read; the message ends with why.
    pub fn unreadable(
        setting: impl Into<String>,
        value: impl ToString,
        expected: &str,
        source: impl Into<Cause>,
    ) -> Self {
        Self::invalid_because(
            setting.into(),
            value.to_string(),
            expected,
            Some(source.into()),
        )
    }

    fn invalid_because(
        setting: String,
        value: String,
        expected: &str,
        source: Option<Cause>,
    ) -> Self {
        Self::Invalid {
            setting,
            value,
            expected: expected.to_owned(),
            at: String::new(),
            source,
        }
    }
}

/// Why a file could not be read: an I/O error, or the file's format.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// ` (<why>)` after what is expected, when a file could not be read.
fn because(source: Option<&Cause>) -> String {
    source.map_or_else(String::new, |e| format!(" ({e})"))
}

/// An error's message on one line (a `.env` parse error quotes the line it stopped at).
fn one_line(e: &dotenvy::Error) -> String {
    e.to_string().replace('\n', "\\n")
}
