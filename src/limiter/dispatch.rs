//! The dispatcher: one thread that grants tokens to parked requests.
//!
//! It sleeps (`park_timeout`, ~50 µs precision, unlike a millisecond async timer) until
//! the earliest next token of any provider with waiters, and is unparked when a request
//! is parked or a rate changes. It always wakes a little late; the bucket anchors a grant
//! late by at most its slack (`min(T/4, 20 ms)`) on the token's due time, so the lateness
//! is caught up and the long-run rate stays the configured one, while grants stay at
//! least `T - slack` apart. Later than the slack, a wake-up only delays the grant. It
//! also drives retreat recovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Limiter;
use crate::clock::SharedClock;

/// Longest sleep: how often retreat recovery is checked.
const TICK: Duration = Duration::from_millis(100);

/// Handle of the dispatcher thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Dispatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dispatcher {
    /// Starts the thread for `limiters` (named for the transition log lines).
    pub fn spawn(
        limiters: Vec<(Arc<str>, Arc<Limiter>)>,
        clock: SharedClock,
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
                while !flag.load(Ordering::Acquire) {
                    let now = clock.now_nanos();
                    let mut sleep = TICK;
                    for (name, l) in &limiters {
                        if let Some(t) = l.tick(now) {
                            tracing::warn!(
                                provider = &**name,
                                from = t.from.as_str(),
                                to = t.to.as_str(),
                                effective_rpm = t.effective_rpm,
                                "retreat state change"
                            );
                        }
                        if let Some(wait) = l.dispatch(now) {
                            sleep = sleep.min(wait);
                        }
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

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
