//! The token budget's series (issue 19): per provider, the tokens counted by kind, the
//! estimate error, and the budget as [`Limiter::token_view`](crate::limiter::Limiter::token_view)
//! shows it.
//!
//! Written for the providers that have a token budget, or counted tokens before it was
//! turned off (a counter never vanishes once it moved); the budget's gauges only while
//! the budget is on. A sidecar where no provider ever had one writes none of these
//! families, not even their `# HELP` lines. Requests refused because their estimate
//! exceeds a whole window are `sidecar_dropped_total{reason="tokens_too_large"}`.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::family::{family, Res};
use crate::app::ProviderSnapshot;
use crate::limiter::TokenView;
use crate::stats::TokenCounts;

/// One provider's token budget and counts, copied at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Tokened<'a> {
    pub provider: &'a str,
    /// `None`: the budget is off.
    pub view: Option<TokenView>,
    pub counts: TokenCounts,
}

/// The providers of `app` with a token budget or token counts, their counts taken
/// from `snaps` (the providers' snapshots, in order).
pub fn collect<'a>(
    app: &'a crate::app::App,
    snaps: &[ProviderSnapshot],
    now: u64,
) -> Vec<Tokened<'a>> {
    app.providers
        .iter()
        .zip(snaps)
        .map(|(p, s)| Tokened {
            provider: &p.name,
            view: p.limiter.token_view(now),
            counts: s.stats.tokens,
        })
        .filter(|t| t.view.is_some() || !t.counts.is_zero())
        .collect()
}

type ReadView = fn(&TokenView) -> u64;

/// Writes every token family; nothing at all when `tokened` is empty.
pub fn encode(enc: &mut DescriptorEncoder, tokened: &[Tokened]) -> Res {
    if tokened.is_empty() {
        return Ok(());
    }
    let mut f = family(
        enc,
        "sidecar_tokens",
        "Tokens of settled requests, by kind: prompt and completion as the provider reported them (usage), estimated (reserved at admission), settled (charged in the end).",
        MetricType::Counter,
    )?;
    for t in tokened {
        let c = &t.counts;
        for (kind, v) in [
            ("prompt", c.prompt),
            ("completion", c.completion),
            ("estimated", c.estimated),
            ("settled", c.settled),
        ] {
            f.counter(&[("provider", t.provider), ("kind", kind)], v)?;
        }
    }
    let mut f = family(
        enc,
        "sidecar_token_estimate_ratio",
        "Estimate error of settled requests with usage: tokens estimated at admission divided by the prompt and completion tokens reported (above 1: overestimated).",
        MetricType::Histogram,
    )?;
    for t in tokened {
        let c = &t.counts;
        f.histogram_buckets(
            &[("provider", t.provider)],
            c.ratio_sum(),
            c.ratio_count(),
            &c.ratio_buckets(),
        )?;
    }

    let on: Vec<(&str, TokenView)> = tokened
        .iter()
        .filter_map(|t| t.view.map(|v| (t.provider, v)))
        .collect();
    if on.is_empty() {
        return Ok(());
    }
    let gauges: [(&str, &str, ReadView); 4] = [
        (
            "sidecar_token_budget_limit",
            "Tokens per provider window the token budget allows now: the lowest of the configured, stated and learned limits.",
            |v| v.limit,
        ),
        (
            "sidecar_token_budget_ceiling",
            "Tokens per provider window as configured (tokens_per_minute scaled to the window): the most the limit may reach.",
            |v| v.ceiling,
        ),
        (
            "sidecar_token_budget_remaining",
            "Tokens the budget may still charge in the rolling window: the limit less what is charged and reserved (at least 0).",
            |v| v.remaining,
        ),
        (
            "sidecar_token_waiting",
            "Estimated tokens of the requests parked in the queue.",
            |v| v.waiting,
        ),
    ];
    for (metric, help, get) in gauges {
        let mut f = family(enc, metric, help, MetricType::Gauge)?;
        for (name, v) in &on {
            f.gauge(&[("provider", name)], get(v) as f64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
