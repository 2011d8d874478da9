//! The settings an operator may change while the sidecar runs, as one immutable value
//! per version ([`Hot`]; its fields come from the table in [`crate::config::runtime`]).
//!
//! The request path loads the current [`Hot`] once per request (an `ArcSwap` load: no
//! lock, no contention) and uses that value throughout, so a request sees one version
//! or the next, never half of a change. Changes (the admin API, SIGHUP) are
//! serialised by [`HotConfig::update`]: it validates the whole change first, pushes
//! rates and queue bounds into the providers' limiters, then swaps the value in.
//! Everything else in [`crate::config::Config`] needs a restart.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

pub use crate::config::runtime::{Hot, HotProvider};

/// The current [`Hot`] and the lock that serialises changes to it.
#[derive(Debug)]
pub struct HotConfig {
    current: ArcSwap<Hot>,
    writer: Mutex<()>,
}

impl HotConfig {
    pub fn new(hot: Hot) -> Self {
        Self {
            current: ArcSwap::from_pointee(hot),
            writer: Mutex::new(()),
        }
    }

    /// The current version, for one request's use.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Hot>> {
        self.current.load()
    }

    /// The current version, owned.
    pub fn get(&self) -> Arc<Hot> {
        self.current.load_full()
    }

    /// Runs `change` on the current value while holding the writer lock; if it returns
    /// a new value, `apply` pushes it into the running parts and it becomes current with
    /// the next version number. `change` sees the value that will be replaced, so a
    /// conditional change (`If-Match`) cannot race another writer.
    pub fn update<E>(
        &self,
        change: impl FnOnce(&Hot) -> Result<Hot, E>,
        apply: impl FnOnce(&Hot, &Hot),
    ) -> Result<(Arc<Hot>, Arc<Hot>), E> {
        let _w = self.writer.lock();
        let old = self.current.load_full();
        let mut new = change(&old)?;
        new.version = old.version + 1;
        apply(&old, &new);
        let new = Arc::new(new);
        self.current.store(Arc::clone(&new));
        Ok((old, new))
    }
}
