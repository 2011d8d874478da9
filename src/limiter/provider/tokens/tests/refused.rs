//! A parked request whose cost the token limit falls below: the dispatcher refuses it
//! with the limit and its estimate, once, instead of letting it wait for an empty span.

use super::*;
use crate::limiter::queue::testing::answer;
use crate::limiter::queue::{DropReason, TooLarge};

#[test]
fn a_parked_request_the_limit_falls_below_is_refused_with_the_limit_and_its_estimate() {
    let l = budgeted(10_000);
    let _sent = send(&l, 8_000, 0);
    let mut big = queued(l.admit(Priority::Normal, cost(5_000), 0));
    let mut small = queued(l.admit(Priority::Normal, cost(3_000), 0));
    assert!(l.dispatch(0).is_some(), "neither fits yet");
    assert_eq!(answer(&mut big), None);

    // An admin change lowers the limit under the head's cost.
    l.set_token_limit(4_000);
    assert!(l.dispatch(S).is_some(), "the small one still waits");
    assert_eq!(
        answer(&mut big),
        Some(Err(TooLarge {
            limit: 4_000,
            estimate: 5_000
        }))
    );
    assert_eq!(
        answer(&mut small),
        None,
        "3,000 fits a 4,000 budget: it waits"
    );
    let c = l.queues.counts();
    assert_eq!((c.total, c.dequeued), (1, 0));
    assert_eq!(c.dropped(DropReason::TokensTooLarge), 1);
    assert_eq!(l.token_view(S).unwrap().waiting, 3_000);

    // One answer only: a cancel afterwards loses and counts nothing, and nothing goes
    // back to the dispatcher.
    assert!(!big.cancel(DropReason::ClientGone));
    drop(big);
    let c = l.queues.counts();
    assert_eq!((c.abandoned, c.dropped(DropReason::ClientGone)), (1, 0));
    assert_eq!(l.queues.take_unused_grant(), None);
}

#[test]
fn a_token_429_stating_a_lower_limit_refuses_the_waiters_it_no_longer_fits() {
    let l = budgeted(10_000);
    let _sent = send(&l, 8_000, 0);
    let mut big = queued(l.admit(Priority::Normal, cost(5_000), 0));
    let stated = TokenRefusal {
        limit_tpm: Some(4_000),
        ..TokenRefusal::default()
    };
    l.on_answer(
        S,
        0,
        1,
        &token_429(Some(Duration::from_secs(1)), Some(stated)),
    );
    control(&l, S);
    assert_eq!(l.token_view(S).unwrap().limit, 4_000);
    assert_eq!(l.dispatch(S), None, "nobody left waiting");
    assert_eq!(
        answer(&mut big),
        Some(Err(TooLarge {
            limit: 4_000,
            estimate: 5_000
        }))
    );
}

#[test]
fn every_waiter_too_large_is_refused_at_once_whatever_its_place_and_a_retry_when_staged() {
    let l = budgeted(10_000);
    let _sent = send(&l, 8_000, 0);
    // A high one that does not fit yet holds the dispatcher's attention; a low one
    // behind it would wait for it.
    let mut high = queued(l.admit(Priority::High, cost(3_000), 0));
    let mut low = queued(l.admit(Priority::Low, cost(5_000), 0));
    assert!(l.dispatch(0).is_some());
    l.set_token_limit(4_000);
    assert!(l.dispatch(S).is_some(), "the high one still waits");
    assert_eq!(answer(&mut high), None);
    assert!(
        matches!(answer(&mut low), Some(Err(TooLarge { limit: 4_000, .. }))),
        "refused at once, not after the high one"
    );
    // A request put back after a 429 is parked without admission's check: the
    // dispatcher refuses it when it stages it.
    let mut again = l.requeue(Priority::High, cost(4_500), S).unwrap();
    assert!(l.dispatch(S).is_some());
    assert_eq!(
        answer(&mut again),
        Some(Err(TooLarge {
            limit: 4_000,
            estimate: 4_500
        }))
    );
    assert_eq!(answer(&mut high), None);
    assert_eq!(l.queues.counts().dropped(DropReason::TokensTooLarge), 2);
}
