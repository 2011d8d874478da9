//! Secrets (API keys, the admin token): never printed whole, and read either from a
//! setting or from a file that holds them (the Docker and Kubernetes secrets convention).

use std::io::Read;

use super::error::ConfigError;

/// A secret (API key, admin token). `Debug` and [`Secret::masked`] show 4 characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `None` for an empty string: an empty key means "no key".
    pub fn new(value: String) -> Option<Self> {
        (!value.is_empty()).then_some(Self(value))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// First four characters followed by `****`; a secret of 8 characters or fewer
    /// shows none, since four would be half of it.
    pub fn masked(&self) -> String {
        if self.0.chars().count() <= 8 {
            return "****".to_owned();
        }
        let head: String = self.0.chars().take(4).collect();
        format!("{head}****")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// `text` masked as a secret (also when empty, which [`Secret::new`] refuses).
pub(super) fn mask(text: &str) -> String {
    Secret(text.to_owned()).masked()
}

/// A secret given either inline or as a file holding it (its first non-empty line);
/// both at once is an error, as is a file that cannot be read or holds no such line.
pub(super) fn secret_or_file(
    (key, value): (&str, String),
    (file_key, path): (&str, String),
) -> Result<Option<Secret>, ConfigError> {
    let path = path.trim();
    if path.is_empty() {
        return Ok(Secret::new(value));
    }
    if !value.is_empty() {
        return Err(ConfigError::invalid(
            file_key,
            path,
            &format!("either {key} or {file_key}, not both"),
        ));
    }
    match first_line(path) {
        Ok(Some(line)) => Ok(Secret::new(line)),
        Ok(None) => Err(ConfigError::invalid(
            file_key,
            path,
            "a file whose first non-empty line is the secret (this one is empty)",
        )),
        Err(e) => Err(ConfigError::unreadable(
            file_key,
            path,
            "a readable file holding the secret",
            e,
        )),
    }
}

/// The first non-empty line of a small file, trimmed (`None`: no such line). At most
/// 64 KiB are read, so a device or a huge file cannot stall start-up.
pub(super) fn first_line(path: &str) -> Result<Option<String>, std::io::Error> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(64 * 1024)
        .read_to_string(&mut text)?;
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned))
}
