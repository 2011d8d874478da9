//! Admission control for one provider: token bucket, window guard, wait queues, and the
//! controller that learns the provider's limit.
//!
//! Plain data structures on atomics — no hyper, no tokio, no lock on the request path —
//! so each rule is unit-tested on a fake clock and the CAS protocols under loom. The
//! async waiting lives in the request path (`proxy`), the granting in [`dispatch`], a
//! thread that sleeps until the next grant is due and also runs the controller.
//!
//! A request goes when the bucket has a token (even spacing at the paced rate) *and*
//! the window guard has room (never more than the limit in any rolling window, as
//! counted at the sidecar) *and*, when a token limit is configured, the token budget
//! has room for its estimated cost (never more than the token limit charged in any
//! rolling window); the guard's claim and the token reservation travel with the request
//! and are stamped with the time it is written upstream; the reservation is settled
//! from the answer's usage. Fast path: when nobody waits, one CAS each.
//! Otherwise it is parked (never jumping those already waiting) and granted in strict
//! priority order.
//!
//! The parts, bottom up: [`bucket`], [`guard`], [`token_budget`], [`queue`], [`window`]
//! and [`retreat`] count; [`learn`] and [`signal`] decide from numbers and answers; [`control`] holds
//! the controller's state and messages; [`provider`] joins them into one [`Limiter`]
//! (admission, the controller step); [`scopes`] and [`lease`] give it per-model limits
//! and cluster tokens ([`token_lease`]: the token budget's); [`dispatch`] runs it. This
//! file only declares and re-exports.

pub mod bucket;
pub mod control;
pub mod dispatch;
pub mod guard;
pub mod learn;
pub mod lease;
pub mod pacing;
pub mod provider;
pub mod queue;
pub mod retreat;
pub mod scopes;
pub mod signal;
pub(crate) mod sync;
pub mod token_budget;
pub mod token_lease;
pub mod window;

pub use bucket::TokenBucket;
pub use control::{ClusterPacing, Event, Note, PacingView, PauseReason};
pub use guard::{Claim, Margin, WindowGuard};
pub use learn::{Change, Source};
pub use lease::{LeasePot, Mode, PotLease};
pub use pacing::Pacing;
pub use provider::{Decision, Limiter, Permit, Reservation, Settlement, TokenSignals};
pub use queue::{DropReason, Flow, Grant, QueueCounts, QueueFull, Ticket, TooLarge, WaitQueues};
pub use retreat::{AnswerCounts, Retreat, RetreatConfig, RetreatState, RetreatView, Transition};
pub use signal::{Answer, Quota, Refusal, TokenQuota, TokenRefusal};
pub use token_budget::{Charge, Cost, Settled, TokenBudget, TokenView, Usage};
pub use token_lease::{Adjustment, TokenPot, TokenReport};
