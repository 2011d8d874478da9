//! The state the mock's workers share: its configuration, counters, limits and judge
//! (the gate), the header dialect, and the requests it recorded.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use parking_lot::Mutex;

use super::admit::Gate;
use super::config::MockConfig;
use super::headers::HeaderPolicy;
use super::stats::MockStats;

/// What the mock saw of one request (tests check the forwarded headers).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// State shared by the mock's workers.
pub struct MockShared {
    pub config: MockConfig,
    pub stats: MockStats,
    /// Shared with the answers that charge tokens when they end ([`super::admit::Meter`]).
    pub(super) gate: Arc<Gate>,
    pub(super) headers: HeaderPolicy,
    /// The start-up window, for limits set without one.
    pub(super) window: Duration,
    pub(super) seen: Mutex<Vec<Seen>>,
    pub(super) peers: Mutex<HashSet<SocketAddr>>,
}
