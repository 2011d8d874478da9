//! Talking to upstream providers: connection set-up and the per-worker pool.

mod connector;
mod pool;

pub use connector::{ConnectError, Connector, Handshaken, UpBody};
pub use pool::{Lease, Pool, SendError};
