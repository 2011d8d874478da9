//! Talking to upstream providers: connection set-up, the per-worker pool, and a lean
//! HTTP/1.1 client driven by each request's own task.

mod body;
mod connector;
pub mod h1;
mod idle;
mod io;
mod pool;
#[cfg(test)]
mod tests;

pub use body::{BodyError, RespBody};
pub use connector::{ConnectError, Connector, Handshaken};
pub use h1::head::{RequestHead, KEEP_ALL};
pub use pool::{Pool, RequestError, SendError};

use http::HeaderValue;

use crate::config::Secret;

/// `Authorization: Bearer <key>`, marked sensitive (hpack never indexes it); built once
/// per provider, not per request.
pub fn bearer(key: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
    v.set_sensitive(true);
    Some(v)
}
