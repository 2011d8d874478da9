//! What the metrics listener says: every metric in the Prometheus text format, read
//! from the app at scrape time.
//!
//! - `render`: the families of the whole app ([`render()`]);
//! - `cluster`: the shared budget's families and the replicas' shares;
//! - `limiter`: the queue's flow and the learned limit;
//! - `tokens`: the token budget's counts, estimate error and remaining budget;
//! - `family`: one family written label set by label set;
//! - `endpoint`: the listener's one route, `GET /metrics` ([`serve`]).

pub mod cluster;
mod endpoint;
mod family;
mod limiter;
mod render;
mod tokens;

pub use endpoint::serve;
pub use render::{render, CONTENT_TYPE};
