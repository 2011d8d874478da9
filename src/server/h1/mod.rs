//! A lean HTTP/1.1 server connection, driven in the connection's own task: the pieces
//! of the wire it speaks (the loop itself is `connection::http1`, which sits above
//! the request body type and the handler).
//!
//! hyper's server connection costs about half of what the sidecar spends on a
//! request (its dispatcher, buffers, a boxed timer and six allocations a request), and
//! it keeps 16 KiB of buffers for an idle connection's whole life. Here one loop reads a
//! head (`httparse`, see [`head`]), calls the handler, writes its answer ([`write`])
//! and waits for the next head; the request body is read from the socket by whoever
//! polls it, in the same task ([`wire`]). An idle connection holds its socket and its
//! task, no buffer: reads land in the worker's arena.
//!
//! Spoken: HTTP/1.0 and 1.1, keep-alive, pipelined requests (answered in order),
//! bodies by length or chunks, `Expect: 100-continue`, `HEAD`, answers by length,
//! chunks or the close. Not spoken: upgrades (the request is served as a plain one).
//!
//! Limits: a head is at most [`HeadLimits`] (else a JSON 431, then the close); it must
//! arrive within the header read timeout of its first byte (else a JSON 408); an idle
//! connection closes after that same timeout. A request whose body is left unread gets
//! its answer, then the connection closes *lingering*: the server stops writing, reads
//! and discards what the client still sends (at most the linger bound, for at most
//! [`crate::framing::LINGER_TIME`]) so the client reads its answer before the close.
//!
//! Draining: an idle connection closes at once; one with a request in flight answers
//! it with `Connection: close`, then closes.

pub mod head;
pub mod wire;
pub mod write;

use std::rc::Rc;
use std::time::Duration;

use crate::http1::Maps;
pub use head::HeadLimits;
use wire::Arena;
use write::Scratch;

/// What the HTTP/1 connections of one worker share.
#[derive(Debug)]
pub struct H1 {
    pub(super) arena: Rc<Arena>,
    /// Header maps recycled between requests (shared with the handler, which hands
    /// back what it read).
    pub(super) maps: Rc<Maps>,
    pub(super) scratch: Scratch,
    pub(super) limits: HeadLimits,
    /// How long a head may take from its first byte, and an idle connection may wait.
    pub(super) timeout: Duration,
    pub(super) keep_alive: bool,
    /// Most bytes read and discarded while lingering.
    pub(super) linger_bytes: u64,
}

impl H1 {
    pub fn new(
        limits: HeadLimits,
        timeout: Duration,
        keep_alive: bool,
        linger_bytes: u64,
        maps: Rc<Maps>,
    ) -> Self {
        Self {
            arena: Rc::default(),
            maps,
            scratch: Scratch::default(),
            limits,
            timeout,
            keep_alive,
            linger_bytes,
        }
    }
}

#[cfg(test)]
mod tests;
