//! Header maps kept for the next request, within one worker.
//!
//! Every proxied request builds two maps: its own head's, and the upstream answer's.
//! Each `HeaderMap` is two allocations (its index and its entries) made and freed per
//! request; handed back here once read, a map is cleared and its storage serves the
//! next head (2 allocations a request instead of 6). Bounded both ways: at most
//! [`KEPT`] maps wait here, and a map grown past [`MAX_CAPACITY`] (a head with very
//! many headers) is freed rather than kept, so a burst of large heads does not pin
//! their memory.

use std::cell::RefCell;

use http::HeaderMap;

/// Most maps kept.
pub const KEPT: usize = 16;

/// Largest map kept (entries it can hold without growing).
pub const MAX_CAPACITY: usize = 64;

/// One worker's spare header maps (single-threaded: a `RefCell`).
#[derive(Debug, Default)]
pub struct Maps {
    free: RefCell<Vec<HeaderMap>>,
}

impl Maps {
    /// An empty map, with room for about `n` headers when a new one has to be made.
    pub fn take(&self, n: usize) -> HeaderMap {
        match self.free.borrow_mut().pop() {
            Some(map) => map,
            None => HeaderMap::with_capacity(n),
        }
    }

    /// `map` was read to its end: its storage serves a later head.
    pub fn put(&self, mut map: HeaderMap) {
        let cap = map.capacity();
        if cap == 0 || cap > MAX_CAPACITY {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < KEPT {
            map.clear();
            free.push(map);
        }
    }

    /// Maps waiting to be reused.
    pub fn len(&self) -> usize {
        self.free.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderValue, HOST};

    #[test]
    fn a_map_comes_back_empty_with_its_storage() {
        let maps = Maps::default();
        let mut m = maps.take(4);
        m.insert(HOST, HeaderValue::from_static("a"));
        let cap = m.capacity();
        maps.put(m);
        assert_eq!(maps.len(), 1);
        let again = maps.take(4);
        assert!(again.is_empty(), "cleared before reuse");
        assert_eq!(again.capacity(), cap, "the same storage");
        assert!(maps.is_empty());
    }

    #[test]
    fn kept_maps_are_bounded_in_number_and_size() {
        let maps = Maps::default();
        for _ in 0..KEPT + 5 {
            maps.put(HeaderMap::with_capacity(4));
        }
        assert_eq!(maps.len(), KEPT);
        let maps = Maps::default();
        maps.put(HeaderMap::with_capacity(MAX_CAPACITY * 4));
        maps.put(HeaderMap::new());
        assert!(
            maps.is_empty(),
            "a huge map and one never allocated are not kept"
        );
    }
}
