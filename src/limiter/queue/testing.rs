//! How a test sees a ticket: polled by hand, with a waker that counts its wake-ups.
//! Shared with the limiter's admission tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use super::{Grant, Ticket, TooLarge};

/// A waker that counts its wake-ups.
#[derive(Default)]
pub struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl CountingWaker {
    pub fn wakes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

pub fn poll_with(ticket: &mut Ticket, waker: &Waker) -> Poll<()> {
    Pin::new(ticket)
        .poll(&mut Context::from_waker(waker))
        .map(|_| ())
}

/// The ticket's answer, if it has one when polled now.
pub fn answer(ticket: &mut Ticket) -> Option<Result<Grant, TooLarge>> {
    let waker = Waker::from(Arc::new(CountingWaker::default()));
    match Pin::new(ticket).poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(a) => Some(a),
        Poll::Pending => None,
    }
}

pub fn is_granted(ticket: &mut Ticket) -> bool {
    matches!(answer(ticket), Some(Ok(_)))
}
