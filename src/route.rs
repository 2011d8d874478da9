//! Which provider serves a request: by the JSON body's `model`, else the default.
//!
//! The model is read without building a DOM: a borrowed struct with one field makes
//! serde skip everything else, so a request body is scanned once and never copied.
//! Patterns are globs with `*` (`meta/*`, `nvidia/*`, `*`), tried in declaration order.

use std::borrow::Cow;

use wildmatch::WildMatch;

use crate::config::ProviderConfig;

/// Model-to-provider routing table, built once from the configuration.
#[derive(Debug)]
pub struct Router {
    rules: Vec<(WildMatch, usize)>,
    default: usize,
}

impl Router {
    pub fn new(providers: &[ProviderConfig], default: usize) -> Self {
        let rules = providers
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.models.iter().map(move |m| (WildMatch::new(m), i)))
            .collect();
        Self { rules, default }
    }

    /// Whether the model can pick another provider than the default (with one provider,
    /// or every pattern naming the default, the body need not be read for routing).
    pub fn routes_by_model(&self) -> bool {
        self.rules.iter().any(|(_, i)| *i != self.default)
    }

    /// Index of the provider for `model` (the default when `None` or unmatched).
    pub fn provider_for(&self, model: Option<&str>) -> usize {
        model
            .and_then(|m| self.rules.iter().find(|(pat, _)| pat.matches(m)))
            .map_or(self.default, |(_, i)| *i)
    }
}

#[derive(serde::Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// The top-level `model` string of a JSON object body; `None` for anything else.
pub fn extract_model(body: &[u8]) -> Option<Cow<'_, str>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice::<ModelOnly<'_>>(body).ok()?.model
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamUrl;
    use std::time::Duration;

    fn provider(name: &str, models: &[&str]) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            upstream: UpstreamUrl::parse("http://127.0.0.1:1/v1").unwrap(),
            api_key: None,
            rate_rpm: 40.0,
            bucket_capacity: 1,
            queue_max_size: 1,
            low_priority_timeout: Duration::from_secs(1),
            models: models.iter().map(|s| s.to_string()).collect(),
            fallback: None,
            window: Duration::from_secs(60),
            rate_limit_headers: Default::default(),
            limit_scope: Default::default(),
            budget: name.into(),
            tokens_per_minute: 0,
            token_charge: Default::default(),
            request_usage: false,
            token_rules: Default::default(),
        }
    }

    #[test]
    fn model_patterns_route_in_declaration_order_with_a_default() {
        let r = Router::new(
            &[
                provider("nvidia", &["meta/*", "nvidia/*"]),
                provider("openai", &["gpt-*"]),
                provider("local", &[]),
            ],
            2,
        );
        assert_eq!(r.provider_for(Some("meta/llama-3.1-8b-instruct")), 0);
        assert_eq!(r.provider_for(Some("nvidia/nemotron")), 0);
        assert_eq!(r.provider_for(Some("gpt-4o")), 1);
        assert_eq!(r.provider_for(Some("mistral")), 2);
        assert_eq!(r.provider_for(None), 2);
        assert!(r.routes_by_model());
    }

    #[test]
    fn patterns_that_all_name_the_default_need_no_model() {
        let one = Router::new(&[provider("nvidia", &["*"])], 0);
        assert!(!one.routes_by_model());
        assert_eq!(one.provider_for(Some("anything")), 0);
        let to_default = Router::new(&[provider("a", &[]), provider("b", &["meta/*"])], 1);
        assert!(!to_default.routes_by_model());
        let away = Router::new(&[provider("a", &[]), provider("b", &["meta/*"])], 0);
        assert!(away.routes_by_model());
    }

    #[test]
    fn model_is_found_at_the_top_level_only() {
        let body =
            br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"model":"meta/llama"}"#;
        assert_eq!(extract_model(body).as_deref(), Some("meta/llama"));
        assert_eq!(extract_model(br#"{"input":{"model":"inner"}}"#), None);
        assert_eq!(
            extract_model(br#"{"model":"esc\u0061ped"}"#).as_deref(),
            Some("escaped")
        );
        assert_eq!(extract_model(b"not json"), None);
        assert_eq!(extract_model(b"[1,2]"), None);
        assert_eq!(extract_model(br#"{"model":5}"#), None);
    }
}
