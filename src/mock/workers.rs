//! NVIDIA's per-model cap on requests in flight (`--worker-limit`): a slot per request,
//! held by its answer's body and freed when that is dropped, so a cancelled or finished
//! answer can never leak one.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Requests in flight per model, against one cap.
#[derive(Debug)]
pub struct Workers {
    limit: usize,
    in_flight: Mutex<HashMap<Option<String>, usize>>,
}

impl Workers {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `model`, or `Err(limit)` when all are taken.
    pub fn acquire(this: &Arc<Self>, model: Option<&str>) -> Result<WorkerSlot, usize> {
        let key = model.map(str::to_owned);
        let mut m = this.in_flight.lock();
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= this.limit {
            return Err(this.limit);
        }
        *n += 1;
        Ok(WorkerSlot {
            workers: Arc::clone(this),
            key,
        })
    }
}

/// One request in flight for a model; dropping it (when the answer's body ends or the
/// client goes away) frees the slot.
#[derive(Debug)]
pub struct WorkerSlot {
    workers: Arc<Workers>,
    key: Option<String>,
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        let mut m = self.workers.in_flight.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_slots_are_per_model_and_freed_on_drop() {
        let w = Arc::new(Workers::new(2));
        let a1 = Workers::acquire(&w, Some("a")).unwrap();
        let _a2 = Workers::acquire(&w, Some("a")).unwrap();
        assert_eq!(Workers::acquire(&w, Some("a")).unwrap_err(), 2);
        let _b = Workers::acquire(&w, Some("b")).unwrap();
        let _none = Workers::acquire(&w, None).unwrap();
        drop(a1);
        assert!(Workers::acquire(&w, Some("a")).is_ok());
    }
}
