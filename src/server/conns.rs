//! The connections of one worker: how many are open, how many idle between requests
//! (*parked*: an idle HTTP/1 connection holds its socket and its task, no buffer),
//! and which are silent (see `fairness`). The worker waits for none to be left when
//! it drains.

use std::cell::Cell;
use std::rc::Rc;

use super::fairness::SilentSet;

#[derive(Debug)]
pub(super) struct Conns {
    pub(super) open: Cell<usize>,
    pub(super) parked: Cell<usize>,
    pub(super) silent: Rc<SilentSet>,
    none_left: tokio::sync::Notify,
}

impl Conns {
    pub(super) fn new() -> Self {
        Self {
            open: Cell::new(0),
            parked: Cell::new(0),
            silent: Rc::default(),
            none_left: tokio::sync::Notify::new(),
        }
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        self.open.get()
    }

    /// HTTP/1 connections waiting for their next request now.
    pub(super) fn parked(&self) -> usize {
        self.parked.get()
    }

    /// Resolves once no connection is open.
    pub(super) async fn none_left(&self) {
        while self.open.get() > 0 {
            self.none_left.notified().await;
        }
    }
}

/// One open connection in its worker's count, released when dropped.
pub(super) struct Open(pub(super) Rc<Conns>);

impl Open {
    pub(super) fn new(conns: Rc<Conns>) -> Self {
        conns.open.set(conns.open.get() + 1);
        Self(conns)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let n = self.0.open.get().saturating_sub(1);
        self.0.open.set(n);
        if n == 0 {
            self.0.none_left.notify_one();
        }
    }
}
