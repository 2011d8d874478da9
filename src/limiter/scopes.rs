//! Per-model scopes (`limit_scope = "model"`): each model seen at run time gets a
//! limiter of its own — learned limit, window guard, bucket and wait queues — under the
//! provider key's, because a provider's models do not all share one limit (NVIDIA's
//! hosted models do not).
//!
//! A request waits for its model's grant first, in that model's own queues, then for
//! the key's; so a model whose window is full holds only its own requests back. Model
//! names come from clients: they are cut to [`MAX_MODEL_LEN`] bytes and at most
//! `max` scopes live at once; a new model past that evicts the least recently used
//! idle one (nobody waiting in it). Its window history goes with it, so an evicted
//! model that comes back is learned again (the key's window still bounds the total).
//! When every scope has waiters, a new model gets none: it is paced by the key alone.
//!
//! The map is a `DashMap` (sharded locks): it is read once per request of a
//! model-scoped provider, never held across an await, and written only when a new
//! model appears. It holds any [`Scoped`] limiter (the crate's is `Limiter`, which
//! holds this map in turn): so this module does not depend on the one built on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::Thread;

use dashmap::DashMap;

use super::pacing::Pacing;
use super::retreat::RetreatConfig;

/// Longest model name kept as a scope key.
pub const MAX_MODEL_LEN: usize = 256;

/// Default bound on live model scopes per provider.
pub const MAX_MODELS: usize = 256;

/// What every model scope of a provider is built from.
#[derive(Debug, Clone, Copy)]
pub struct Template {
    pub rate_rpm: f64,
    pub capacity: u32,
    pub queue_max: usize,
    pub retreat: RetreatConfig,
    pub pacing: Pacing,
    /// Tokens per window of each model's token budget (`None`: off).
    pub token_limit: Option<u64>,
}

/// What the map needs of a model's limiter.
pub trait Scoped {
    /// A new model's limiter, made from the key's template at `now`: `wake` is the
    /// dispatcher thread, `restored` the limit learned for the model before a restart.
    fn from_template(t: &Template, now: u64, wake: Option<&Thread>, restored: Option<u32>) -> Self;
    /// Nobody waits in it: it may be evicted.
    fn is_idle(&self) -> bool;
    /// A new bound on its wait queues.
    fn set_queue_bound(&self, max: usize);
}

/// One model's limiter and when it was last used.
#[derive(Debug)]
pub struct Scope<L> {
    pub limiter: Arc<L>,
    used_at: AtomicU64,
}

/// The model scopes of one provider.
#[derive(Debug)]
pub struct Models<L> {
    map: DashMap<Arc<str>, Arc<Scope<L>>>,
    template: parking_lot::Mutex<Template>,
    /// Limits learned before a restart, applied when the model is seen again.
    restored: parking_lot::Mutex<std::collections::HashMap<String, u32>>,
    max: usize,
    evicted: AtomicU64,
}

impl<L: Scoped> Models<L> {
    pub fn new(template: Template, max: usize) -> Self {
        Self {
            map: DashMap::new(),
            template: parking_lot::Mutex::new(template),
            restored: parking_lot::Mutex::new(std::collections::HashMap::new()),
            max: max.max(1),
            evicted: AtomicU64::new(0),
        }
    }

    /// The scope of `model` at `now`, made when it is new (`None`: the bound is reached
    /// and every scope has waiters). `wake`: the dispatcher thread, for a new limiter.
    pub fn get(&self, model: &str, now: u64, wake: Option<&Thread>) -> Option<Arc<L>> {
        let model = cut(model);
        if let Some(s) = self.map.get(model) {
            // Relaxed: an LRU hint.
            s.used_at.store(now, Ordering::Relaxed);
            return Some(Arc::clone(&s.limiter));
        }
        if self.map.len() >= self.max && !self.evict_one() {
            return None;
        }
        let t = *self.template.lock();
        let entry = self.map.entry(Arc::from(model)).or_insert_with(|| {
            let restored = self.restored.lock().remove(model);
            Arc::new(Scope {
                limiter: Arc::new(L::from_template(&t, now, wake, restored)),
                used_at: AtomicU64::new(now),
            })
        });
        Some(Arc::clone(&entry.limiter))
    }

    /// Drops the least recently used scope nobody waits in; false when there is none.
    fn evict_one(&self) -> bool {
        let victim = self
            .map
            .iter()
            .filter(|e| e.limiter.is_idle())
            .min_by_key(|e| e.used_at.load(Ordering::Relaxed))
            .map(|e| Arc::clone(e.key()));
        match victim {
            Some(k) => {
                self.map.remove(&k);
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Every live scope, by model name (for the controller, the dispatcher and views).
    pub fn all(&self) -> Vec<(Arc<str>, Arc<L>)> {
        self.map
            .iter()
            .map(|e| (Arc::clone(e.key()), Arc::clone(&e.limiter)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Scopes evicted so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// A new configured rate and capacity for scopes made from now on (the caller
    /// applies it to the live ones).
    pub fn set_rate(&self, rate_rpm: f64, capacity: u32) {
        let mut t = self.template.lock();
        t.rate_rpm = rate_rpm;
        t.capacity = capacity;
    }

    /// Limits learned before a restart, by model.
    pub fn restore(&self, limits: std::collections::HashMap<String, u32>) {
        *self.restored.lock() = limits;
    }

    pub fn set_queue_max(&self, queue_max: usize) {
        self.template.lock().queue_max = queue_max;
        for e in self.map.iter() {
            e.limiter.set_queue_bound(queue_max);
        }
    }
}

/// `model` cut to at most [`MAX_MODEL_LEN`] bytes on a character boundary.
fn cut(model: &str) -> &str {
    if model.len() <= MAX_MODEL_LEN {
        return model;
    }
    let mut end = MAX_MODEL_LEN;
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    &model[..end]
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;
    use crate::limiter::Limiter;

    /// The map as the crate uses it: of real limiters.
    fn models(max: usize) -> Models<Limiter> {
        Models::new(
            Template {
                rate_rpm: 600.0,
                capacity: 1,
                queue_max: 8,
                retreat: RetreatConfig::default(),
                pacing: Pacing::default(),
                token_limit: None,
            },
            max,
        )
    }

    #[test]
    fn each_model_gets_its_own_limiter_and_the_same_one_again() {
        let m = models(4);
        let a = m.get("a", 0, None).unwrap();
        let b = m.get("b", 0, None).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&a, &m.get("a", 1, None).unwrap()));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn past_the_bound_the_least_recently_used_idle_model_is_evicted() {
        let m = models(2);
        let a = m.get("a", 0, None).unwrap();
        m.get("b", 1, None);
        let _waiting = a
            .queues
            .enqueue(crate::priority::Priority::Normal, false)
            .unwrap();
        m.get("a", 2, None);
        m.get("c", 3, None); // evicts b: a is busier and used later
        let names: Vec<String> = m.all().iter().map(|(k, _)| k.to_string()).collect();
        assert!(
            names.contains(&"a".to_owned()) && names.contains(&"c".to_owned()),
            "{names:?}"
        );
        assert_eq!(m.evicted(), 1);
        // Nobody idle to evict: the new model gets no scope (the key paces it alone).
        let c = m.get("c", 4, None).unwrap();
        let _w = c
            .queues
            .enqueue(crate::priority::Priority::Normal, false)
            .unwrap();
        assert!(m.get("d", 5, None).is_none());
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn long_model_names_are_cut_to_one_scope() {
        let m = models(4);
        let long = "x".repeat(1000);
        let a = m.get(&long, 0, None).unwrap();
        let b = m.get(&format!("{long}y"), 0, None).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(m.all()[0].0.len(), MAX_MODEL_LEN);
    }
}
