//! The README's "Coming from the Python service" section, checked against the code: every
//! `SIDECAR_*` variable it names is a setting, every metric it names as this sidecar's
//! (`sidecar_*`, `process_*`) is in a real scrape, and every path it names in backticks
//! (`/api/...`, optionally after a method: `POST /api/admin/config`) answers something
//! other than 404 on a running sidecar.

mod common;

use std::collections::BTreeSet;

use common::*;
use nvidia_sidecar::mock::MockConfig;

/// Where the section lives, and its heading.
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
const HEADING: &str = "## Coming from the Python service";

const ADMIN_TOKEN: &str = "migration-test-admin-token-7f3a";

/// The section: from its heading to the next `## ` heading.
fn section() -> String {
    let text = std::fs::read_to_string(README).unwrap_or_else(|e| panic!("{README}: {e}"));
    let start = text
        .find(&format!("{HEADING}\n"))
        .unwrap_or_else(|| panic!("{README} has no {HEADING:?} section"));
    let body = &text[start + HEADING.len()..];
    let end = body.find("\n## ").unwrap_or(body.len());
    body[..end].to_owned()
}

/// Every word that starts with `prefix` (at a word boundary) and goes on with at least
/// one character `part` accepts; a trailing `_` is not part of it (`SIDECAR_` alone is
/// the prefix, not a name).
fn names(text: &str, prefix: &str, part: fn(char) -> bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        let boundary = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if !boundary {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        let len = rest.find(|c: char| !part(c)).unwrap_or(rest.len());
        let name = rest[..len].trim_end_matches('_');
        if !name.is_empty() {
            out.insert(format!("{prefix}{name}"));
        }
    }
    out
}

/// `(method, path)` of every backticked span that is a path of ours: `/...` or
/// `METHOD /...`, without spaces in the path.
fn paths(text: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for span in text.split('`').skip(1).step_by(2) {
        let (method, path) = match span.split_once(' ') {
            Some((m, p)) if ["GET", "HEAD", "POST", "PATCH"].contains(&m) => (m, p),
            _ => ("GET", span),
        };
        if path.starts_with('/') && !path.contains(' ') {
            out.insert((method.to_owned(), path.to_owned()));
        }
    }
    out
}

#[test]
fn every_variable_the_section_names_is_a_setting() {
    let text = section();
    let named = names(&text, "SIDECAR_", |c| {
        c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
    });
    assert!(
        named.len() >= 12,
        "the section should map every Python setting: {named:?}"
    );
    let settings: BTreeSet<&str> = nvidia_sidecar::config::SETTINGS
        .iter()
        .map(|s| s.env)
        .collect();
    let unknown: Vec<_> = named
        .iter()
        .filter(|n| !settings.contains(n.as_str()))
        .collect();
    assert!(unknown.is_empty(), "not settings: {unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_section_names_as_ours_is_in_a_scrape() {
    let text = section();
    let part = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut named = names(&text, "sidecar_", part);
    named.extend(names(&text, "process_", part));
    assert!(named.len() >= 10, "few metrics named: {named:?}");

    let s = stack(
        MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        },
        &[],
    );
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let m = s.metrics_addr;
    let scrape = call(m, req("GET", m, "/metrics", &[], "")).await;
    assert_eq!(scrape.status, 200);
    // Sample names, and family names as declared (a histogram's samples end in
    // `_bucket`, `_sum`, `_count`; the section names the family).
    let served: BTreeSet<String> = scrape
        .text()
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = named.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named in the section but not in /metrics: {missing:?}"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_the_section_names_answers_other_than_404() {
    let text = section();
    let named = paths(&text);
    assert!(named.len() >= 8, "few paths named: {named:?}");
    let s = stack(
        MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        },
        &[("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    let provider = s.app.providers[0].name.to_string();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for (method, path) in &named {
        assert!(!path.contains('*'), "{path}: name a path, not a pattern");
        let path = path.replace("{name}", &provider);
        // `/metrics` is on the metrics listener; everything else on the proxy's.
        let addr = if path == "/metrics" {
            s.metrics_addr
        } else {
            s.addr
        };
        let body = match method.as_str() {
            "POST" | "PATCH" if path.starts_with("/v1/") => CHAT,
            "POST" | "PATCH" if path == "/api/admin/config" => r#"{"log_level": "info"}"#,
            _ => "",
        };
        let headers = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        // Only the head: `/api/dashboard/stream` never ends by itself.
        let resp = send(addr, req(method, addr, &path, &headers, body))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_ne!(
            resp.status().as_u16(),
            404,
            "{method} {path} is named in the section but not served"
        );
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[test]
fn the_scanners_find_names_and_paths_and_skip_bare_prefixes() {
    let text = "`SIDECAR_` prefix, `SIDECAR_RATE_RPM`; not MY_SIDECAR_X. \
                `sidecar_queue_depth{provider}` and `sidecar_` and nvidia-sidecar. \
                `GET /api/dashboard`, `POST /api/admin/providers/{name}/forget`, `/healthz`, \
                `{\"detail\": \"...\"}`, `host:port`, `/v1/ chat`.";
    let upper = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
    assert_eq!(
        names(text, "SIDECAR_", upper)
            .into_iter()
            .collect::<Vec<_>>(),
        ["SIDECAR_RATE_RPM"]
    );
    let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    assert_eq!(
        names(text, "sidecar_", lower)
            .into_iter()
            .collect::<Vec<_>>(),
        ["sidecar_queue_depth"]
    );
    let p: Vec<_> = paths(text).into_iter().collect();
    assert_eq!(
        p,
        [
            ("GET".to_owned(), "/api/dashboard".to_owned()),
            ("GET".to_owned(), "/healthz".to_owned()),
            (
                "POST".to_owned(),
                "/api/admin/providers/{name}/forget".to_owned()
            ),
        ]
    );
}
