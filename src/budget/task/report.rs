//! What goes to every replica through the script: the provider's refusals and limit
//! headers as `refused` ops, the admin's changes as `configure` and `forget`.

use std::time::Duration;

use super::{Op, Task};
use crate::budget::handle::Command;
use crate::limiter::learn::per_window;
use crate::limiter::{Event, Refusal};

impl Task {
    /// The provider's answer `ev` as an op for the cluster (`None`: it stays local).
    pub(super) fn report_op(&self, ev: Event) -> Option<Op> {
        let ms = |d: Option<Duration>| {
            d.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let args = match ev {
            Event::Refused {
                sent_at,
                kind,
                retry_after,
                ..
            } => match kind {
                Refusal::RateLimit => vec![
                    "rate".to_owned(),
                    (i64::try_from(sent_at / 1_000_000).unwrap_or(0) + self.offset_ms).to_string(),
                    ms(retry_after).to_string(),
                ],
                Refusal::Concurrency | Refusal::Overload => {
                    vec![
                        "retreat".to_owned(),
                        "0".to_owned(),
                        ms(retry_after).to_string(),
                    ]
                }
                // Token limits are paused locally; billing is passed on.
                Refusal::Tokens | Refusal::Billing => return None,
            },
            Event::HeaderLimit { limit_rpm } => vec![
                "header".to_owned(),
                per_window(limit_rpm as f64, self.window()).to_string(),
                "-1".to_owned(),
            ],
            Event::QuotaSpent { reset } => {
                vec![
                    "quota".to_owned(),
                    "0".to_owned(),
                    ms(Some(reset)).to_string(),
                ]
            }
        };
        Some(Op {
            name: "refused",
            args,
        })
    }
}

impl From<Command> for Op {
    fn from(c: Command) -> Self {
        match c {
            Command::Configure {
                rate_rpm,
                bucket_capacity,
                fallback,
                tokens_per_minute,
                tokens_per_window,
            } => Op {
                name: "configure",
                args: vec![
                    "rate_rpm".into(),
                    rate_rpm.to_string(),
                    "capacity".into(),
                    bucket_capacity.to_string(),
                    "fallback".into(),
                    u8::from(fallback).to_string(),
                    "tokens_per_minute".into(),
                    tokens_per_minute.to_string(),
                    "tokens_limit".into(),
                    tokens_per_window.to_string(),
                ],
            },
            Command::Tokens {
                tokens_per_minute,
                tokens_per_window,
            } => Op {
                name: "configure",
                args: vec![
                    "tokens_per_minute".into(),
                    tokens_per_minute.to_string(),
                    "tokens_limit".into(),
                    tokens_per_window.to_string(),
                ],
            },
            Command::Forget => Op {
                name: "forget",
                args: Vec::new(),
            },
        }
    }
}
