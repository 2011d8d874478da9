//! Who this replica is in a shared budget.

use std::sync::Arc;

/// This replica's id in the shared budget: host name, process id and a random part (so a
/// restarted process is a new replica), without the separators the script uses.
pub fn replica_id() -> Arc<str> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "sidecar".to_owned());
    let clean: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    Arc::from(format!(
        "{clean}-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    ))
}
