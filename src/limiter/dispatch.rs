//! The dispatcher: one thread that grants tokens to parked requests and runs each
//! limiter's controller (learning, probing, retreat recovery; see [`super::control`]).
//!
//! It sleeps (`park_timeout`, ~50 µs precision, unlike a millisecond async timer) until
//! the earliest next token of any provider with waiters, and is unparked when a request
//! is parked or a rate changes. It always wakes a little late; the bucket anchors a grant
//! late by at most its slack (`min(T/4, 20 ms)`) on the token's due time, so the lateness
//! is caught up and the long-run rate stays the configured one, while grants stay at
//! least `T - slack` apart. Later than the slack, a wake-up only delays the grant. Every
//! change the controllers make is logged here, once, with why.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::control::Note;
use super::learn;
use super::provider::Limiter;
use crate::clock::SharedClock;
use crate::state_file;

/// Longest sleep: how often the controllers run without an event, as a share of the
/// shortest provider window (100 ms for a minute), so probes and recovery follow it.
fn tick(limiters: &[(Arc<str>, Arc<Limiter>)]) -> Duration {
    let window = limiters
        .iter()
        .map(|(_, l)| l.pacing().window)
        .min()
        .unwrap_or(Duration::from_secs(60));
    (window / 600).max(Duration::from_millis(1))
}

/// Handle of the dispatcher thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Dispatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dispatcher {
    /// Starts the thread for `limiters` (named for the transition log lines).
    /// Learned limits are written to `state_file` (when set) after each change.
    pub fn spawn(
        limiters: Vec<(Arc<str>, Arc<Limiter>)>,
        clock: SharedClock,
        state_file: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || {
                for (_, l) in &limiters {
                    l.set_dispatcher(std::thread::current());
                }
                // Acquire: pairs with the Release in Drop.
                let longest = tick(&limiters);
                while !flag.load(Ordering::Acquire) {
                    let now = clock.now_nanos();
                    let mut sleep = longest;
                    let mut learned = false;
                    for (name, l) in &limiters {
                        l.control_all(now, &mut |model, n| {
                            learned |= matches!(n, Note::Limit(_));
                            log(name, model, l, n)
                        });
                        if let Some(wait) = l.dispatch_all(now) {
                            sleep = sleep.min(wait);
                        }
                    }
                    if let Some(path) = state_file.as_deref().filter(|_| learned) {
                        save(path, &limiters, now);
                    }
                    if !sleep.is_zero() {
                        std::thread::park_timeout(sleep);
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Writes every provider's learned limit to the state file (a few hundred bytes, only
/// after a change: rare enough to do here rather than in a thread of its own).
fn save(path: &Path, limiters: &[(Arc<str>, Arc<Limiter>)], now: u64) {
    let entry = |l: &Limiter| {
        let v = l.pacing_view(now);
        (v.source != learn::Source::Config).then(|| state_file::Entry {
            learned: v.learned,
            window_secs: v.window.as_secs_f64(),
            source: v.source.as_str().to_owned(),
        })
    };
    let mut entries = std::collections::BTreeMap::new();
    for (name, l) in limiters {
        if let Some(e) = entry(l) {
            entries.insert(name.to_string(), e);
        }
        for (model, m) in l.models() {
            if let Some(e) = entry(&m) {
                entries.insert(format!("{name}{}{model}", state_file::MODEL_SEP), e);
            }
        }
    }
    if let Err(e) = state_file::save(path, entries) {
        tracing::error!(error = %e, "learned limits not saved");
    }
}

/// One log line per controller change.
fn log(provider: &str, model: Option<&str>, l: &Limiter, note: Note) {
    let window = l.pacing().window;
    let model = model.unwrap_or("");
    match note {
        Note::Limit(c) => tracing::warn!(
            provider,
            model,
            from = c.from,
            to = c.to,
            per_window_secs = window.as_secs_f64(),
            to_rpm = learn::rpm_of(c.to, window),
            source = c.source.as_str(),
            why = %c.why,
            "learned limit change"
        ),
        Note::Retreat(t) => tracing::warn!(
            provider,
            model,
            from = t.from.as_str(),
            to = t.to.as_str(),
            factor = t.factor,
            "retreat state change"
        ),
        Note::Pause { reason, until, now } => tracing::warn!(
            provider,
            model,
            reason = reason.as_str(),
            seconds = until.saturating_sub(now) as f64 / 1e9,
            "admission paused"
        ),
        Note::TokenLimit => tracing::warn!(
            provider,
            "the provider refuses on a token limit (429 about tokens): the sidecar paces requests only; set tokens_per_minute, or lower rate_rpm"
        ),
        Note::Tokens(c) => tracing::warn!(
            provider,
            model,
            from = c.from,
            to = c.to,
            per_window_secs = window.as_secs_f64(),
            why = %c.why,
            "token limit change"
        ),
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
