//! What the simulated provider decides before answering: a worker slot for the model
//! (NVIDIA-style concurrency cap), then the rolling windows (the global one and the
//! model's own), all of which must admit.
//!
//! Invariants: a request refused by any window enters none of them; a worker-limit
//! refusal enters no window and no judge's record. Every window decision is taken under
//! the global window's lock with the time read inside it, so windows and the judge see
//! times in order. Until some limit exists ("judging"), requests skip the lock entirely:
//! the throughput load test measures the mock unlimited, and a lock per request would
//! be what it measures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::judge::Judge;
use super::limit::{self, LimitState, Quota, Refusal, WindowLimit};

/// The window whose numbers an answer reports: the one closest to refusing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub quota: Quota,
    pub max: usize,
    pub window: Duration,
}

/// All limits of the mock at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsState {
    pub global: LimitState,
    pub models: Vec<(String, LimitState)>,
}

/// The rolling windows and the worker slots of one mock.
pub struct Gate {
    global: WindowLimit,
    models: RwLock<HashMap<String, Arc<WindowLimit>>>,
    /// Set once any limit exists (or at start with `judge`); never cleared, so the
    /// judge's record has no holes. Relaxed: a request racing with the first limit may
    /// go either way, as it would at a provider.
    judging: AtomicBool,
    workers: Option<Arc<Workers>>,
    pub judge: Judge,
}

impl Gate {
    /// `global` is the start-up limit (`None`: unlimited); `models` the per-model ones.
    pub fn new(
        global: Option<usize>,
        window: Duration,
        models: &[(String, Option<usize>)],
        worker_limit: Option<usize>,
        judge: bool,
        start: Instant,
    ) -> Self {
        let global = match global {
            Some(max) => WindowLimit::with_max(max, window),
            None => WindowLimit::unlimited(window),
        };
        let judging = judge || global.is_limited() || !models.is_empty();
        Self {
            global,
            models: RwLock::new(
                models
                    .iter()
                    .map(|(m, max)| {
                        let l = match max {
                            Some(max) => WindowLimit::with_max(*max, window),
                            None => WindowLimit::unlimited(window),
                        };
                        (m.clone(), Arc::new(l))
                    })
                    .collect(),
            ),
            judging: AtomicBool::new(judging),
            workers: worker_limit.map(|limit| {
                Arc::new(Workers {
                    limit,
                    in_flight: Mutex::new(HashMap::new()),
                })
            }),
            judge: Judge::new(start),
        }
    }

    /// Whether decisions need the request's model.
    pub fn wants_model(&self) -> bool {
        self.workers.is_some() || self.judging.load(Ordering::Relaxed)
    }

    pub fn is_judging(&self) -> bool {
        self.judging.load(Ordering::Relaxed)
    }

    /// Sets the global limit (`rpm` ≤ 0: unlimited) keeping the window's history.
    pub fn set_limit(&self, rpm: f64, window: Duration) {
        let window = limit::clamp_window(window);
        match limit::max_for(rpm, window) {
            Some(max) => self.global.set(max, window),
            None => self.global.set_unlimited(window),
        }
        self.judging.store(true, Ordering::Relaxed);
    }

    /// Sets `model`'s own limit (`rpm` ≤ 0: unlimited); a new model's window starts empty.
    pub fn set_model_limit(&self, model: &str, rpm: f64, window: Duration) {
        let window = limit::clamp_window(window);
        let max = limit::max_for(rpm, window);
        let mut models = self.models.write();
        let l = models
            .entry(model.to_owned())
            .or_insert_with(|| Arc::new(WindowLimit::unlimited(window)));
        match max {
            Some(max) => l.set(max, window),
            None => l.set_unlimited(window),
        }
        drop(models);
        self.judging.store(true, Ordering::Relaxed);
    }

    pub fn state_at(&self, now: Instant) -> LimitsState {
        let mut models: Vec<(String, LimitState)> = self
            .models
            .read()
            .iter()
            .map(|(m, l)| (m.clone(), l.state_at(now)))
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        LimitsState {
            global: self.global.state_at(now),
            models,
        }
    }

    /// A worker slot for `model`, held until the answer's body ends; `Err(limit)` when
    /// all are taken. `Ok(None)` without a worker limit.
    pub fn worker(&self, model: Option<&str>) -> Result<Option<WorkerSlot>, usize> {
        match &self.workers {
            Some(w) => Workers::acquire(w, model).map(Some),
            None => Ok(None),
        }
    }

    /// Passes a request for `model` through the windows now.
    pub fn admit(&self, model: Option<&str>) -> Result<Option<Binding>, Refusal> {
        if !self.judging.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.decide(model, Instant::now)
    }

    /// The same at a given time.
    #[cfg(test)]
    pub fn admit_at(&self, model: Option<&str>, now: Instant) -> Result<Option<Binding>, Refusal> {
        self.decide(model, || now)
    }

    fn decide(
        &self,
        model: Option<&str>,
        now: impl FnOnce() -> Instant,
    ) -> Result<Option<Binding>, Refusal> {
        let own = model.and_then(|m| self.models.read().get(m).cloned());
        // Lock order: global window, then the model's (the map's read guard is already
        // gone); `set_*` and `state_at` never hold the global window with another.
        let mut global = self.global.lock();
        let mut own = own.as_ref().map(|l| l.lock());
        let now = now();
        global.prune(now);
        if let Some(own) = own.as_deref_mut() {
            own.prune(now);
        }
        // Both must admit; when both refuse, the client must wait for the later one.
        let refusal = [
            global.check(now),
            own.as_deref().map_or(Ok(()), |o| o.check(now)),
        ]
        .into_iter()
        .filter_map(Result::err)
        .max_by_key(|r| r.wait);
        if let Some(r) = refusal {
            self.judge.record(now, model, false);
            return Err(r);
        }
        let mut binding: Option<Binding> = None;
        for w in std::iter::once(&mut *global).chain(own.as_deref_mut()) {
            let quota = w.admit(now);
            if !w.is_limited() {
                continue;
            }
            let b = Binding {
                quota,
                max: w.max(),
                window: w.window(),
            };
            binding = Some(match binding {
                Some(prev) if prev.quota.remaining <= quota.remaining => prev,
                _ => b,
            });
        }
        self.judge.record(now, model, true);
        Ok(binding)
    }
}

/// Requests in flight per model, against one cap.
#[derive(Debug)]
struct Workers {
    limit: usize,
    in_flight: Mutex<HashMap<Option<String>, usize>>,
}

impl Workers {
    fn acquire(this: &Arc<Self>, model: Option<&str>) -> Result<WorkerSlot, usize> {
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
    use crate::mock::judge::Filter;

    const S: Duration = Duration::from_secs(1);

    fn gate(global: Option<usize>, models: &[(&str, usize)]) -> (Gate, Instant) {
        let t0 = Instant::now();
        let models: Vec<(String, Option<usize>)> = models
            .iter()
            .map(|(m, n)| (m.to_string(), Some(*n)))
            .collect();
        (Gate::new(global, 10 * S, &models, None, false, t0), t0)
    }

    #[test]
    fn model_windows_are_independent_of_each_other_and_of_an_unlimited_global() {
        let (g, t0) = gate(None, &[("a", 2), ("b", 1)]);
        assert!(g.admit_at(Some("a"), t0).is_ok());
        assert!(g.admit_at(Some("a"), t0).is_ok());
        assert!(g.admit_at(Some("a"), t0).is_err());
        assert!(g.admit_at(Some("b"), t0).is_ok(), "b has its own window");
        assert!(g.admit_at(Some("b"), t0).is_err());
        for _ in 0..50 {
            assert_eq!(g.admit_at(Some("c"), t0), Ok(None), "c is unlimited");
            assert_eq!(g.admit_at(None, t0), Ok(None));
        }
        assert_eq!(g.judge.refused_total(), 2);
        let a = g.judge.verdicts(Filter::Model("a"), 10 * S, t0);
        assert_eq!((a.admitted, a.refused, a.max_in_rolling), (2, 1, 2));
    }

    #[test]
    fn a_request_must_pass_both_windows_and_a_refusal_enters_neither() {
        let (g, t0) = gate(Some(3), &[("a", 2)]);
        g.admit_at(Some("a"), t0).unwrap();
        g.admit_at(Some("a"), t0 + S).unwrap();
        let r = g.admit_at(Some("a"), t0 + 2 * S).unwrap_err();
        assert_eq!((r.max, r.wait), (2, 8 * S), "the model's window refused");
        // The refused one did not enter the global window: one global slot is left.
        let b = g.admit_at(Some("x"), t0 + 2 * S).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (3, 0));
        let r = g.admit_at(Some("y"), t0 + 3 * S).unwrap_err();
        assert_eq!((r.max, r.wait), (3, 7 * S), "the global window refused");
        // When both refuse, the answer names the longer wait.
        g.set_limit(60.0, 10 * S); // 10 per 10 s
        g.set_model_limit("a", 6.0, 10 * S); // 1 per 10 s
        let r = g.admit_at(Some("a"), t0 + 3 * S).unwrap_err();
        assert_eq!(
            (r.max, r.wait),
            (1, 8 * S),
            "a's second admission leaves at 11 s"
        );
    }

    #[test]
    fn the_binding_window_is_the_one_with_least_remaining() {
        let (g, t0) = gate(Some(5), &[("a", 2)]);
        let b = g.admit_at(Some("a"), t0).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (2, 1));
        let b = g.admit_at(Some("z"), t0).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (5, 3));
    }

    #[test]
    fn limits_set_at_run_time_start_judging_and_keep_history() {
        let (g, t0) = gate(None, &[]);
        assert!(!g.is_judging());
        g.set_limit(30.0, 6 * S); // 3 per 6 s
        assert!(g.is_judging());
        for _ in 0..3 {
            g.admit_at(None, t0).unwrap();
        }
        assert!(g.admit_at(None, t0 + S).is_err());
        g.set_limit(0.0, 6 * S);
        assert_eq!(g.admit_at(None, t0 + S), Ok(None), "unlimited: no headers");
        g.set_limit(40.0, 6 * S); // 4 per 6 s, and 4 are on record
        assert_eq!(g.admit_at(None, t0 + S).unwrap_err().wait, 5 * S);
        let st = g.state_at(t0 + S);
        assert_eq!((st.global.max, st.global.in_window), (Some(4), 4));
    }

    #[test]
    fn worker_slots_are_per_model_and_freed_on_drop() {
        let t0 = Instant::now();
        let g = Gate::new(None, S, &[], Some(2), false, t0);
        let a1 = g.worker(Some("a")).unwrap();
        let _a2 = g.worker(Some("a")).unwrap();
        assert_eq!(g.worker(Some("a")).unwrap_err(), 2);
        let _b = g.worker(Some("b")).unwrap();
        let _none = g.worker(None).unwrap();
        drop(a1);
        assert!(g.worker(Some("a")).is_ok());
    }
}
