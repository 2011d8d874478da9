//! The `route` phase: which provider (and, when limits are per model, which model's
//! limiter) a request goes to. The model is read from the body only when it picks the
//! provider, scopes the limit or the access log shows it: parsing the body is the
//! costliest step of a small request otherwise.

use std::sync::Arc;

use bytes::Bytes;

use crate::app::{App, Provider};
use crate::framing::truncate;
use crate::limiter::Limiter;
use crate::record::Record;

/// Where a request goes.
pub struct Routed<'a> {
    pub provider: &'a Provider,
    /// The model's own limiter, when the provider learns limits per model.
    pub scope: Option<Arc<Limiter>>,
    /// The model was read from the body (so `record.model` is known).
    pub model_read: bool,
}

/// Routes the request whose body is `body`; the provider and model go into `record`.
#[inline(always)]
pub fn route<'a>(app: &'a App, body: &Bytes, record: &mut Record) -> Routed<'a> {
    let model_read =
        app.router.routes_by_model() || app.model_scoped || crate::record::access_log_enabled();
    let model = model_read.then(|| model_of(body)).flatten();
    let index = app.router.provider_for(model.as_deref());
    let provider = &app.providers[index];
    record.route_to(index, Arc::clone(&provider.name));
    record.model = model;
    let scope = record
        .model
        .as_deref()
        .and_then(|m| provider.limiter.scope(m, app.clock.now_nanos()));
    Routed {
        provider,
        scope,
        model_read,
    }
}

/// The request's `model`, cut to 256 bytes.
pub fn model_of(body: &Bytes) -> Option<String> {
    crate::route::extract_model(body).map(|m| truncate(&m, 256))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;
    use http::{HeaderValue, Method};

    fn app(toml: &str) -> Arc<App> {
        App::new(config(toml, &[]))
    }

    fn record() -> Record {
        Record::new(
            HeaderValue::from_static("id"),
            Method::POST,
            http::Uri::from_static("/v1/x"),
        )
    }

    const TWO: &str = r#"
        default_provider = "main"
        [[providers]]
        name = "main"
        upstream_url = "http://127.0.0.1:1"
        models = ["meta/*"]
        [[providers]]
        name = "other"
        upstream_url = "http://127.0.0.1:2"
        models = ["mistralai/*"]
    "#;

    #[test]
    fn the_model_picks_the_provider_and_goes_on_the_record() {
        let app = app(TWO);
        let mut rec = record();
        let r = route(
            &app,
            &Bytes::from_static(br#"{"model":"mistralai/large"}"#),
            &mut rec,
        );
        assert_eq!(&*r.provider.name, "other");
        assert!(r.model_read && r.scope.is_none());
        assert_eq!(rec.model.as_deref(), Some("mistralai/large"));
        let mut rec = record();
        let r = route(&app, &Bytes::from_static(br#"{"messages":[]}"#), &mut rec);
        assert_eq!(&*r.provider.name, "main", "no model: the default provider");
    }

    #[test]
    fn per_model_limits_give_the_model_its_own_limiter() {
        let app = app(&TWO.replace(
            "models = [\"meta/*\"]",
            "models = [\"meta/*\"]\n        limit_scope = \"model\"",
        ));
        let mut rec = record();
        let r = route(
            &app,
            &Bytes::from_static(br#"{"model":"meta/llama"}"#),
            &mut rec,
        );
        assert_eq!(&*r.provider.name, "main");
        assert!(r.scope.is_some(), "the model's own limiter");
    }
}
