//! Talking to upstream providers: connection set-up and the per-worker pool.

mod connector;
mod pool;

pub use connector::{ConnectError, Connector, Handshaken, UpBody};
pub use pool::{Lease, Pool, SendError};

use http::HeaderValue;

use crate::config::Secret;

/// `Authorization: Bearer <key>`, marked sensitive (hpack never indexes it); built once
/// per provider, not per request.
pub fn bearer(key: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}
