//! Per-request work outside the network: finding the model, routing, writing the
//! upstream request head, parsing the priority. The naive baseline for `model` is a full
//! `serde_json::Value` DOM, so the gain of the borrowed one-field parse is visible.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use nvidia_sidecar::config::{ProviderConfig, Secret, UpstreamUrl};
use nvidia_sidecar::priority::Priority;
use nvidia_sidecar::proxy::outgoing::Rules;
use nvidia_sidecar::route::{extract_model, Router};
use nvidia_sidecar::upstream::bearer;
use nvidia_sidecar::upstream::h1::head::encode;
use nvidia_sidecar::upstream::RequestHead;

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let small =
        br#"{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}"#
            .to_vec();
    let history: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"role":"user","content":"message number {i} with some words in it to make it longer"}}"#))
        .collect();
    let large = format!(
        r#"{{"messages":[{}],"temperature":0.2,"model":"meta/llama-3.1-8b-instruct","stream":true}}"#,
        history.join(",")
    )
    .into_bytes();
    vec![("small", small), ("large_model_last", large)]
}

fn model(c: &mut Criterion) {
    for (name, body) in bodies() {
        let mut g = c.benchmark_group(format!("extract_model/{name}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function("borrowed_one_field", |b| {
            b.iter(|| extract_model(black_box(&body)))
        });
        g.bench_function("baseline_full_dom", |b| {
            b.iter(|| {
                let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
                v.get("model").and_then(|m| m.as_str()).map(str::to_owned)
            })
        });
        g.finish();
    }
}

fn route_and_headers(c: &mut Criterion) {
    let provider = |name: &str, models: &[&str]| ProviderConfig {
        name: name.into(),
        upstream: UpstreamUrl::parse("http://127.0.0.1:8000/v1").unwrap(),
        api_key: None,
        rate_rpm: 40.0,
        bucket_capacity: 1,
        queue_max_size: 64,
        low_priority_timeout: std::time::Duration::from_secs(30),
        models: models.iter().map(|s| s.to_string()).collect(),
        fallback: None,
        window: std::time::Duration::from_secs(60),
        rate_limit_headers: Default::default(),
        limit_scope: Default::default(),
        budget: name.into(),
        tokens_per_minute: 0,
        token_charge: Default::default(),
        request_usage: false,
        token_rules: Default::default(),
    };
    let router = Router::new(
        &[
            provider("a", &["meta/*", "nvidia/*"]),
            provider("b", &["mistralai/*"]),
            provider("c", &["*"]),
        ],
        2,
    );
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("route_by_model", |b| {
        b.iter(|| router.provider_for(black_box(Some("mistralai/mixtral-8x7b"))))
    });
    g.bench_function("priority_parse", |b| {
        b.iter(|| Priority::parse(black_box(b"low")))
    });
    let mut client = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("authorization", "Bearer app-key"),
        ("user-agent", "OpenAI/Python 1.50.0"),
        ("accept", "application/json"),
        ("x-stainless-lang", "python"),
        ("x-priority", "high"),
        ("connection", "keep-alive"),
    ] {
        client.insert(k, HeaderValue::from_static(v));
    }
    let key = Secret::new("nvapi-0123456789abcdef".into()).and_then(|k| bearer(&k));
    let rid = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    // The upstream's request head as the lean client writes it: the rules made from the
    // client's headers, then the head written into a reused buffer (what every request
    // pays; the client's map is neither copied nor changed).
    let mut out = Vec::with_capacity(1024);
    let host = HeaderValue::from_static("integrate.api.nvidia.com");
    g.bench_function("upstream_request_head", |b| {
        b.iter(|| {
            let client = black_box(&client);
            let rules = Rules::new(client, key.as_ref(), &rid, 120);
            let (set, n) = rules.set();
            out.clear();
            encode(
                &RequestHead {
                    method: &http::Method::POST,
                    target: "/v1/chat/completions",
                    host: &host,
                    headers: client,
                    skip: &|name| rules.skip(name),
                    set: &set[..n],
                },
                &mut out,
            );
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, model, route_and_headers);
criterion_main!(benches);
