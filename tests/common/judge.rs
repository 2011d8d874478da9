//! The simulated provider's judge counts in fixed windows from the moment it started:
//! that moment, and sleeping until a point on the same time line.

use std::time::Duration;

use nvidia_sidecar::mock::MockServer;
use tokio::time::Instant;

/// When the judge's clock started (its fixed windows count from there), to the
/// millisecond: the index of the judge's current 1 ms window is its age.
pub fn judge_epoch(mock: &MockServer) -> Instant {
    let now = Instant::now();
    let age = mock.window_counts(Duration::from_millis(1)).len() as u64 - 1;
    now - Duration::from_millis(age)
}

/// Sleeps until `at` after `t0`.
pub async fn until(t0: Instant, at: Duration) {
    tokio::time::sleep_until(t0 + at).await;
}
