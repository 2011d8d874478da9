//! A worker's idle HTTP/1.1 connections, per upstream: no lock, no atomics.
//!
//! No task watches an idle connection (that would cost a task per connection and a
//! hand-off per request), so a connection is checked when it is taken: one
//! non-blocking read says whether the upstream closed it or sent something unasked,
//! and such a connection is dropped rather than used. A sweep every
//! [`SWEEP_EVERY`] (1 s) drops those the upstream closed and those idle for [`IDLE_TIMEOUT`]
//! (counted in sweeps, so putting a connection back reads no clock), so closed sockets
//! do not linger while traffic is quiet.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use http::uri::Authority;

use super::h1::Conn;
use crate::config::{Scheme, UpstreamUrl};

/// Idle HTTP/1.1 connections kept per upstream per worker.
pub const MAX_IDLE_PER_UPSTREAM: usize = 512;
/// An idle connection older than this is closed (most servers close theirs after 60
/// to 75 s of silence; this only bounds what is kept when they do not).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Often enough that a connection the upstream closes (it stopped, or timed out its
/// side) is closed here within a second, as a connection task watching it would; a
/// sweep is one non-blocking read per idle connection.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// [`IDLE_TIMEOUT`] in sweeps: a connection is closed after idling between
/// `IDLE_TIMEOUT - SWEEP_EVERY` and `IDLE_TIMEOUT`.
pub const IDLE_SWEEPS: u32 = (IDLE_TIMEOUT.as_secs() / SWEEP_EVERY.as_secs()) as u32;

#[derive(Debug, Clone)]
struct Key {
    fingerprint: u64,
    scheme: Scheme,
    authority: Authority,
}

impl Key {
    fn of(url: &UpstreamUrl) -> Self {
        Self {
            fingerprint: url.fingerprint,
            scheme: url.scheme,
            authority: url.authority.clone(),
        }
    }

    fn is(&self, url: &UpstreamUrl) -> bool {
        self.fingerprint == url.fingerprint
            && self.scheme == url.scheme
            && self.authority.as_str() == url.authority.as_str()
    }
}

/// The idle connections of one worker.
#[derive(Default)]
pub struct Idle {
    // A worker talks to a handful of upstreams: a short list scanned by a precomputed
    // fingerprint beats hashing the authority on every checkout. Lists are never
    // removed, so a list's index (its slot) stays valid.
    lists: RefCell<Vec<(Key, Vec<Conn>)>>,
    sweeping: Cell<bool>,
    /// Sweeps so far.
    sweeps: Cell<u32>,
}

impl Idle {
    /// The slot of `url`'s list, made when missing.
    pub fn slot(&self, url: &UpstreamUrl) -> usize {
        let mut lists = self.lists.borrow_mut();
        match lists.iter().position(|(k, _)| k.is(url)) {
            Some(i) => i,
            None => {
                lists.push((Key::of(url), Vec::new()));
                lists.len() - 1
            }
        }
    }

    /// The most recently used connection to `url` that can carry a request, with its
    /// slot; dead ones met on the way are dropped.
    pub fn take(&self, url: &UpstreamUrl) -> Option<(usize, Conn)> {
        let mut lists = self.lists.borrow_mut();
        let slot = lists.iter().position(|(k, _)| k.is(url))?;
        let list = &mut lists[slot].1;
        while let Some(mut conn) = list.pop() {
            if conn.is_reusable() {
                return Some((slot, conn));
            }
        }
        None
    }

    /// Puts `conn` back in `slot` (dropped when the list is full).
    pub fn put(self: &Rc<Self>, slot: usize, mut conn: Conn) {
        let mut lists = self.lists.borrow_mut();
        let Some((_, list)) = lists.get_mut(slot) else {
            return;
        };
        if list.len() >= MAX_IDLE_PER_UPSTREAM {
            return;
        }
        conn.idle_since = self.sweeps.get();
        list.push(conn);
        drop(lists);
        if !self.sweeping.replace(true) {
            tokio::task::spawn_local(sweep(Rc::downgrade(self)));
        }
    }

    /// One sweep: drops the connections closed by their upstream or idle for
    /// [`IDLE_SWEEPS`] sweeps.
    pub fn sweep(&self) {
        let now = self.sweeps.get().wrapping_add(1);
        self.sweeps.set(now);
        for (_, list) in self.lists.borrow_mut().iter_mut() {
            list.retain_mut(|c| now.wrapping_sub(c.idle_since) < IDLE_SWEEPS && c.is_reusable());
        }
    }

    /// Idle connections kept, all upstreams together.
    pub fn len(&self) -> usize {
        self.lists.borrow().iter().map(|(_, l)| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The worker's sweep, for as long as its pool lives.
async fn sweep(idle: Weak<Idle>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        idle.sweep();
    }
}
