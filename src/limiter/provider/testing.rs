//! What the limiter's admission and controller tests share: clock units, a limiter on
//! the default pacing, and the ticket of a parked request.

use super::{Decision, Limiter};
use crate::limiter::queue::Ticket;
use crate::limiter::retreat::RetreatConfig;

pub const S: u64 = 1_000_000_000;
pub const MS: u64 = 1_000_000;

pub fn limiter(rpm: f64, capacity: u32, queue_max: usize) -> Limiter {
    Limiter::new(rpm, capacity, queue_max, RetreatConfig::default())
}

pub fn queued(d: Decision) -> Ticket {
    match d {
        Decision::Queued(t) => t,
        other => panic!("expected Queued, got {other:?}"),
    }
}
