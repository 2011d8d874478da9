//! What the simulated provider decides before answering: a worker slot for the model
//! (NVIDIA-style concurrency cap), then the rolling windows (the global one, the model's
//! own, and the token window), all of which must admit.
//!
//! Invariants: a request refused by any window enters none of them; a worker-limit
//! refusal enters no window and no judge's record. Every window decision, and every
//! token charge made when an answer ends ([`Meter`]), is taken under the global window's
//! lock with the time read inside it, so windows and the judge see times in order. When
//! a request window and the token window both refuse, the refusal with the longer wait
//! is the one answered and recorded (the request window's on a tie); a request too large
//! for the token window is refused as such whatever else. Until some limit exists
//! ("judging"), requests skip the lock entirely: the throughput load test measures the
//! mock unlimited, and a lock per request would be what it measures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::judge::{Cause, Event, Judge};
use super::limit::{self, LimitState, Quota, Refusal, Window, WindowLimit};
use super::tokens::{TokenCharge, TokenLimitState, TokenQuota, TokenRefusal, TokenWindow};
use super::workers::{WorkerSlot, Workers};

/// The window whose numbers an answer reports: the one closest to refusing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub quota: Quota,
    pub max: usize,
    pub window: Duration,
}

/// What an admitted request's answer reports: the binding request window and the token
/// window (each `None` when unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Admission {
    pub requests: Option<Binding>,
    pub tokens: Option<TokenQuota>,
}

/// Why the windows refused a request, with the figures its 429 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A request window; the token window as it stands.
    Requests {
        refusal: Refusal,
        tokens: Option<TokenQuota>,
    },
    /// The token window (`refusal.wait` `None`: too large ever to fit); the binding
    /// request window as it stands.
    Tokens {
        refusal: TokenRefusal,
        requests: Option<Binding>,
        tokens: Option<TokenQuota>,
    },
}

/// All limits of the mock at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsState {
    pub global: LimitState,
    pub models: Vec<(String, LimitState)>,
    pub tokens: TokenLimitState,
}

/// The rolling windows and the worker slots of one mock.
pub struct Gate {
    global: WindowLimit,
    /// Locked after `global` and before a model's window.
    tokens: Mutex<TokenWindow>,
    charge: TokenCharge,
    models: RwLock<HashMap<String, Arc<WindowLimit>>>,
    /// Set once any limit exists (or at start with `judge`); never cleared, so the
    /// judge's record has no holes. Relaxed: a request racing with the first limit may
    /// go either way, as it would at a provider.
    judging: AtomicBool,
    /// Set once a token limit exists; never cleared. Only says what `/mock/*` reports.
    token_judging: AtomicBool,
    workers: Option<Arc<Workers>>,
    pub judge: Judge,
}

impl Gate {
    /// `global` is the start-up request limit (`None`: unlimited), `tokens` the token
    /// window, `models` the per-model request limits.
    pub fn new(
        global: Option<usize>,
        tokens: TokenWindow,
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
        let token_judging = tokens.is_limited();
        let judging = judge || global.is_limited() || token_judging || !models.is_empty();
        Self {
            global,
            charge: tokens.charge_model(),
            tokens: Mutex::new(tokens),
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
            token_judging: AtomicBool::new(token_judging),
            workers: worker_limit.map(|limit| Arc::new(Workers::new(limit))),
            judge: Judge::new(start),
        }
    }

    /// Whether decisions need the request's model and its tokens.
    pub fn wants_model(&self) -> bool {
        self.workers.is_some() || self.judging.load(Ordering::Relaxed)
    }

    pub fn is_judging(&self) -> bool {
        self.judging.load(Ordering::Relaxed)
    }

    /// Whether a token limit exists or existed.
    pub fn is_token_judging(&self) -> bool {
        self.token_judging.load(Ordering::Relaxed)
    }

    pub fn charge_model(&self) -> TokenCharge {
        self.charge
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

    /// Sets the token limit (`tpm` ≤ 0: unlimited) keeping the charges on record.
    pub fn set_token_limit(&self, tpm: f64, window: Duration) {
        let window = limit::clamp_window(window);
        let max = limit::max_for(tpm, window).map(|m| m as u64);
        self.tokens.lock().set(max, window);
        self.token_judging.store(true, Ordering::Relaxed);
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
        let tokens = {
            let mut t = self.tokens.lock();
            t.prune(now);
            t.state()
        };
        LimitsState {
            global: self.global.state_at(now),
            models,
            tokens,
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

    /// Passes a request for `model` through the windows now; `requested` is its prompt
    /// plus its completion bound (charged now under `reserved`).
    pub fn admit(&self, model: Option<&str>, requested: u64) -> Result<Admission, Box<Refused>> {
        if !self.judging.load(Ordering::Relaxed) {
            return Ok(Admission::default());
        }
        self.decide(model, requested, Instant::now)
    }

    /// The same at a given time.
    #[cfg(test)]
    pub fn admit_at(
        &self,
        model: Option<&str>,
        requested: u64,
        now: Instant,
    ) -> Result<Admission, Box<Refused>> {
        self.decide(model, requested, || now)
    }

    fn decide(
        &self,
        model: Option<&str>,
        requested: u64,
        now: impl FnOnce() -> Instant,
    ) -> Result<Admission, Box<Refused>> {
        let own = model.and_then(|m| self.models.read().get(m).cloned());
        // Lock order: global window, tokens, then the model's (the map's read guard is
        // already gone); `set_*` and `state_at` never hold the global window with another.
        let mut global = self.global.lock();
        let mut tokens = self.tokens.lock();
        let mut own = own.as_ref().map(|l| l.lock());
        let now = now();
        global.prune(now);
        tokens.prune(now);
        if let Some(own) = own.as_deref_mut() {
            own.prune(now);
        }
        // Both request windows must admit; when both refuse, the client must wait for
        // the later one.
        let by_requests = [
            global.check(now),
            own.as_deref().map_or(Ok(()), |o| o.check(now)),
        ]
        .into_iter()
        .filter_map(Result::err)
        .max_by_key(|r| r.wait);
        let by_tokens = tokens.check(now, requested).err();
        let cause = match (&by_requests, &by_tokens) {
            (_, Some(t)) if t.wait.is_none() => Some(Cause::TooLarge),
            (Some(r), Some(t)) if t.wait > Some(r.wait) => Some(Cause::Tokens),
            (Some(_), _) => Some(Cause::Requests),
            (None, Some(_)) => Some(Cause::Tokens),
            (None, None) => None,
        };
        let windows = std::iter::once(&*global).chain(own.as_deref());
        match (cause, by_requests, by_tokens) {
            (Some(Cause::Requests), Some(refusal), _) => {
                self.judge
                    .record(now, model, Event::Refused(Cause::Requests));
                return Err(Box::new(Refused::Requests {
                    refusal,
                    tokens: tokens.quota(now),
                }));
            }
            (Some(cause), _, Some(refusal)) => {
                self.judge.record(now, model, Event::Refused(cause));
                let requests = windows.fold(None, |b, w| tighter(b, w, w.peek(now)));
                return Err(Box::new(Refused::Tokens {
                    refusal,
                    requests,
                    tokens: tokens.quota(now),
                }));
            }
            _ => {}
        }
        let mut requests: Option<Binding> = None;
        for w in std::iter::once(&mut *global).chain(own.as_deref_mut()) {
            let quota = w.admit(now);
            requests = tighter(requests, w, quota);
        }
        let charged = match self.charge {
            TokenCharge::Reserved => requested,
            TokenCharge::Actual => 0,
        };
        tokens.charge(now, charged);
        self.judge
            .record(now, model, Event::Admitted { tokens: charged });
        Ok(Admission {
            requests,
            tokens: tokens.quota(now),
        })
    }

    /// Charges `tokens` an answer used now (`actual`), in the token window and the
    /// judge's record.
    pub fn settle(&self, model: Option<&str>, tokens: u64) {
        if tokens == 0 || !self.judging.load(Ordering::Relaxed) {
            return;
        }
        // The global window's lock orders this with every decision.
        let _order = self.global.lock();
        let mut t = self.tokens.lock();
        let now = Instant::now();
        t.prune(now);
        t.charge(now, tokens);
        self.judge.record(now, model, Event::Charged { tokens });
    }
}

/// `prev`, or window `w` with `quota` if it is limited and has less left.
fn tighter(prev: Option<Binding>, w: &Window, quota: Quota) -> Option<Binding> {
    if !w.is_limited() {
        return prev;
    }
    match prev {
        Some(p) if p.quota.remaining <= quota.remaining => Some(p),
        _ => Some(Binding {
            quota,
            max: w.max(),
            window: w.window(),
        }),
    }
}

/// The tokens an answer used so far under `actual`, charged when it ends ([`settle`])
/// or, if it is cut short (a reset, the client gone), when it is dropped.
///
/// [`settle`]: Meter::settle
pub struct Meter {
    gate: Arc<Gate>,
    model: Option<String>,
    tokens: u64,
}

impl Meter {
    pub fn new(gate: Arc<Gate>, model: Option<String>) -> Self {
        Self {
            gate,
            model,
            tokens: 0,
        }
    }

    pub fn add(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    /// Charges what was used, now.
    pub fn settle(self) {}
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.gate.settle(self.model.as_deref(), self.tokens);
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
        let tokens = TokenWindow::new(None, 10 * S, TokenCharge::Reserved);
        (
            Gate::new(global, tokens, 10 * S, &models, None, false, t0),
            t0,
        )
    }

    /// A request of no tokens at `at`: the binding request window, or the refusal.
    fn req(g: &Gate, model: Option<&str>, at: Instant) -> Result<Option<Binding>, Refusal> {
        match g.admit_at(model, 0, at).map_err(|r| *r) {
            Ok(a) => Ok(a.requests),
            Err(Refused::Requests { refusal, .. }) => Err(refusal),
            Err(other) => panic!("not a request refusal: {other:?}"),
        }
    }

    #[test]
    fn model_windows_are_independent_of_each_other_and_of_an_unlimited_global() {
        let (g, t0) = gate(None, &[("a", 2), ("b", 1)]);
        assert!(req(&g, Some("a"), t0).is_ok());
        assert!(req(&g, Some("a"), t0).is_ok());
        assert!(req(&g, Some("a"), t0).is_err());
        assert!(req(&g, Some("b"), t0).is_ok(), "b has its own window");
        assert!(req(&g, Some("b"), t0).is_err());
        for _ in 0..50 {
            assert_eq!(req(&g, Some("c"), t0), Ok(None), "c is unlimited");
            assert_eq!(req(&g, None, t0), Ok(None));
        }
        assert_eq!(g.judge.refused_total(), 2);
        let a = g.judge.verdicts(Filter::Model("a"), 10 * S, t0);
        assert_eq!((a.admitted, a.refused, a.max_in_rolling), (2, 1, 2));
    }

    #[test]
    fn a_request_must_pass_both_windows_and_a_refusal_enters_neither() {
        let (g, t0) = gate(Some(3), &[("a", 2)]);
        req(&g, Some("a"), t0).unwrap();
        req(&g, Some("a"), t0 + S).unwrap();
        let r = req(&g, Some("a"), t0 + 2 * S).unwrap_err();
        assert_eq!((r.max, r.wait), (2, 8 * S), "the model's window refused");
        // The refused one did not enter the global window: one global slot is left.
        let b = req(&g, Some("x"), t0 + 2 * S).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (3, 0));
        let r = req(&g, Some("y"), t0 + 3 * S).unwrap_err();
        assert_eq!((r.max, r.wait), (3, 7 * S), "the global window refused");
        // When both refuse, the answer names the longer wait.
        g.set_limit(60.0, 10 * S); // 10 per 10 s
        g.set_model_limit("a", 6.0, 10 * S); // 1 per 10 s
        let r = req(&g, Some("a"), t0 + 3 * S).unwrap_err();
        assert_eq!(
            (r.max, r.wait),
            (1, 8 * S),
            "a's second admission leaves at 11 s"
        );
    }

    #[test]
    fn the_binding_window_is_the_one_with_least_remaining() {
        let (g, t0) = gate(Some(5), &[("a", 2)]);
        let b = req(&g, Some("a"), t0).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (2, 1));
        let b = req(&g, Some("z"), t0).unwrap().unwrap();
        assert_eq!((b.max, b.quota.remaining), (5, 3));
    }

    #[test]
    fn limits_set_at_run_time_start_judging_and_keep_history() {
        let (g, t0) = gate(None, &[]);
        assert!(!g.is_judging());
        g.set_limit(30.0, 6 * S); // 3 per 6 s
        assert!(g.is_judging());
        for _ in 0..3 {
            req(&g, None, t0).unwrap();
        }
        assert!(req(&g, None, t0 + S).is_err());
        g.set_limit(0.0, 6 * S);
        assert_eq!(req(&g, None, t0 + S), Ok(None), "unlimited: no headers");
        g.set_limit(40.0, 6 * S); // 4 per 6 s, and 4 are on record
        assert_eq!(req(&g, None, t0 + S).unwrap_err().wait, 5 * S);
        let st = g.state_at(t0 + S);
        assert_eq!((st.global.max, st.global.in_window), (Some(4), 4));
    }

    fn token_gate(rpm_max: Option<usize>, tokens: u64, charge: TokenCharge) -> (Gate, Instant) {
        let t0 = Instant::now();
        let tokens = TokenWindow::new(Some(tokens), 10 * S, charge);
        (Gate::new(rpm_max, tokens, 10 * S, &[], None, false, t0), t0)
    }

    fn cause(r: Result<Admission, Box<Refused>>) -> Option<Cause> {
        match r.map_err(|r| *r) {
            Ok(_) => None,
            Err(Refused::Requests { .. }) => Some(Cause::Requests),
            Err(Refused::Tokens { refusal, .. }) if refusal.wait.is_none() => Some(Cause::TooLarge),
            Err(Refused::Tokens { .. }) => Some(Cause::Tokens),
        }
    }

    #[test]
    fn a_request_must_pass_the_token_window_too_and_the_judge_says_which_refused() {
        let (g, t0) = token_gate(Some(3), 100, TokenCharge::Reserved);
        assert!(g.is_judging() && g.is_token_judging());
        let a = g.admit_at(None, 0, t0).unwrap();
        assert_eq!(a.tokens.map(|q| q.remaining), Some(100));
        let a = g.admit_at(None, 60, t0 + S).unwrap();
        assert_eq!(a.tokens.map(|q| (q.remaining, q.reset)), Some((40, 10 * S)));
        assert_eq!(a.requests.map(|b| b.quota.remaining), Some(1));
        // 50 more do not fit; the refusal enters no window.
        match *g.admit_at(None, 50, t0 + S).unwrap_err() {
            Refused::Tokens {
                refusal,
                requests,
                tokens,
            } => {
                assert_eq!((refusal.used, refusal.wait), (60, Some(10 * S)));
                assert_eq!(requests.map(|b| b.quota.remaining), Some(1), "unchanged");
                assert_eq!(tokens.map(|q| q.remaining), Some(40));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cause(g.admit_at(None, 101, t0 + S)), Some(Cause::TooLarge));
        assert_eq!(cause(g.admit_at(None, 40, t0 + S)), None);
        // Both spent: the request window frees first (at 10 s), the tokens at 11 s, so
        // the answer is about tokens.
        assert_eq!(cause(g.admit_at(None, 1, t0 + 2 * S)), Some(Cause::Tokens));
        let v = g.judge.verdicts(Filter::All, 10 * S, t0 + 2 * S);
        assert_eq!(
            (v.admitted, v.refused_requests, v.refused_tokens),
            (3, 0, 3)
        );
        assert_eq!((v.too_large, v.tokens.charged), (1, 100));
        // A request of no tokens fits a full window under `reserved` (used + 0 ≤ max).
        g.set_token_limit(600.0, 10 * S); // the same 100 per 10 s, history kept
        assert_eq!(
            cause(g.admit_at(None, 0, t0 + 2 * S)),
            Some(Cause::Requests)
        );
        assert_eq!(g.state_at(t0 + 2 * S).tokens.used, 100);
    }

    #[test]
    fn actual_charges_nothing_on_arrival_and_settles_when_the_answer_ends() {
        let (g, t0) = token_gate(None, 100, TokenCharge::Actual);
        let a = g.admit_at(Some("m"), 90, t0).unwrap();
        assert_eq!(
            a.tokens.map(|q| q.remaining),
            Some(100),
            "nothing charged yet"
        );
        assert!(a.requests.is_none());
        g.settle(Some("m"), 120);
        assert_eq!(g.state_at(Instant::now()).tokens.used, 120);
        assert_eq!(cause(g.admit(Some("m"), 1)), Some(Cause::Tokens));
        let v = g.judge.verdicts(Filter::Model("m"), 10 * S, Instant::now());
        assert_eq!((v.admitted, v.refused, v.tokens.charged), (1, 1, 120));
    }
}
