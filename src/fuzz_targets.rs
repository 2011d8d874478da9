//! Entry points of the fuzz targets, shared with the corpus replay test so every CI run
//! (on the stable toolchain) exercises the same code the fuzzer does.
//!
//! Each entry point takes arbitrary bytes and must never panic; where an invariant is
//! cheap to state it is asserted, so a violation shows up as a fuzzer crash. The
//! targets under `fuzz/fuzz_targets/` are one-line wrappers around these functions.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Request-path parsers: the `model` finder, the priority header, the request id check.
pub fn request_parsers(data: &[u8]) {
    let _ = crate::route::extract_model(data);
    let _ = crate::priority::Priority::parse(data);
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut h = http::HeaderMap::new();
        h.insert(crate::proxy::headers::X_REQUEST_ID, v);
        let _ = crate::proxy::headers::client_request_id(&h);
    }
}

/// The provider names of the configuration [`admin_patch`] patches, in order.
const PATCH_NAMES: [&str; 2] = ["nvidia", "other"];

/// The configuration [`admin_patch`] patches: two providers with different values, so
/// a change applied to the wrong one shows.
const PATCH_BASE_TOML: &str = r#"
request_timeout = 120
log_level = "info"
default_provider = "nvidia"

[[providers]]
name = "nvidia"
upstream_url = "http://127.0.0.1:9/v1"
rate_rpm = 40
bucket_capacity = 1
queue_max_size = 64
low_priority_timeout = 30

[[providers]]
name = "other"
upstream_url = "http://127.0.0.1:10/v1"
rate_rpm = 600
bucket_capacity = 5
queue_max_size = 8
low_priority_timeout = 2
tokens_per_minute = 150000
"#;

/// The run-time settings of [`PATCH_BASE_TOML`], built once (as the binary would build
/// them from that file with ephemeral ports and one worker).
fn patch_base() -> &'static crate::hot::Hot {
    static BASE: OnceLock<crate::hot::Hot> = OnceLock::new();
    BASE.get_or_init(|| {
        use crate::config::{FileConfig, Settings};
        let file = FileConfig::parse(PATCH_BASE_TOML, "fuzz-base.toml").expect("base TOML");
        let env: HashMap<String, String> = [
            ("SIDECAR_LISTEN_PORT", "0"),
            ("SIDECAR_METRICS_PORT", "0"),
            ("SIDECAR_WORKERS", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config =
            crate::config::from_file(&file, &env, Settings::default()).expect("base configuration");
        let names: Vec<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, PATCH_NAMES, "base provider order");
        crate::hot::Hot::of(&config)
    })
}

/// The admin API's `PATCH /admin/config` body: [`crate::admin::patch::parse`], then
/// [`crate::admin::patch::Patch::apply_to`] a fixed two-provider configuration and
/// [`crate::admin::patch::diff`].
///
/// Checks, when the patch is refused: the message is one line, at most 1000 characters,
/// with one of the shapes of [`crate::admin::patch::MESSAGES`] (so a new or internal
/// message fails fuzzing), and simd-json never refuses a body the admin API's own JSON
/// check accepts (that refusal could only say "not valid JSON" at simd-json's position).
///
/// Checks, when the patch applies: the version is unchanged (the caller numbers
/// versions); every provider and the global defaults stay within the accepted ranges;
/// each field holds exactly the value the patch gives it (a `providers.<name>` field
/// over the top-level one) or its old value; `diff` lists each changed field once and
/// nothing else.
pub fn admin_patch(data: &[u8]) {
    use crate::admin::patch::{self, JsonError, PatchError, Problem};
    use crate::hot::HotProvider;
    use std::time::Duration;

    fn documented(e: &PatchError) {
        let message = e.to_string();
        assert!(e.is_documented(), "a message not in MESSAGES: {message:?}");
        assert!(message.chars().count() <= 1000, "too long: {message:?}");
        assert!(
            !matches!(
                e,
                PatchError::Malformed(JsonError::At {
                    problem: Problem::Refused,
                    ..
                })
            ),
            "simd-json refused a body the JSON check accepts: {message}"
        );
    }

    let p = match patch::parse(data) {
        Ok(p) => p,
        Err(e) => return documented(&e),
    };
    let old = patch_base();
    let new = match p.apply_to(old, &PATCH_NAMES) {
        Ok(new) => new,
        Err(e) => return documented(&e),
    };

    assert_eq!(
        new.version, old.version,
        "apply_to must not number versions"
    );
    assert_eq!(new.providers.len(), old.providers.len());

    fn in_range(what: &str, h: &HotProvider) {
        assert!(
            h.rate_rpm.is_finite() && h.rate_rpm > 0.0 && h.rate_rpm <= 6_000_000.0,
            "{what}.rate_rpm out of range: {}",
            h.rate_rpm
        );
        assert!(
            (1..=1_000_000).contains(&h.bucket_capacity),
            "{what}.bucket_capacity out of range: {}",
            h.bucket_capacity
        );
        assert!(
            h.queue_max_size <= 1_000_000,
            "{what}.queue_max_size out of range: {}",
            h.queue_max_size
        );
        let t = h.low_priority_timeout.as_secs_f64();
        assert!(
            (0.0009..=86_400.0).contains(&t),
            "{what}.low_priority_timeout out of range: {t}"
        );
        assert!(
            h.tokens_per_minute <= 10_000_000_000,
            "{what}.tokens_per_minute out of range: {}",
            h.tokens_per_minute
        );
    }
    in_range("defaults", &new.defaults);
    for (h, name) in new.providers.iter().zip(PATCH_NAMES) {
        in_range(name, h);
    }
    let rt = new.request_timeout.as_secs_f64();
    assert!((0.0009..=86_400.0).contains(&rt), "request_timeout {rt}");

    // The model: each field is the patch's value (named provider over top level) or
    // the old one.
    fn expect(
        old: &HotProvider,
        top: &patch::ProviderPatch,
        named: Option<&patch::ProviderPatch>,
    ) -> HotProvider {
        let pick = |f: fn(&patch::ProviderPatch) -> Option<f64>| named.and_then(f).or(f(top));
        HotProvider {
            rate_rpm: pick(|p| p.rate_rpm).unwrap_or(old.rate_rpm),
            bucket_capacity: pick(|p| p.bucket_capacity).map_or(old.bucket_capacity, |v| v as u32),
            queue_max_size: pick(|p| p.queue_max_size).map_or(old.queue_max_size, |v| v as usize),
            low_priority_timeout: pick(|p| p.low_priority_timeout)
                .map_or(old.low_priority_timeout, Duration::from_secs_f64),
            tokens_per_minute: pick(|p| p.tokens_per_minute)
                .map_or(old.tokens_per_minute, |v| v as u64),
        }
    }
    let top = patch::ProviderPatch {
        rate_rpm: p.rate_rpm,
        bucket_capacity: p.bucket_capacity,
        queue_max_size: p.queue_max_size,
        low_priority_timeout: p.low_priority_timeout,
        tokens_per_minute: p.tokens_per_minute,
    };
    assert_eq!(new.defaults, expect(&old.defaults, &top, None), "defaults");
    for (i, name) in PATCH_NAMES.iter().enumerate() {
        let named = p.providers.as_ref().and_then(|m| m.get(*name));
        assert_eq!(
            new.providers[i],
            expect(&old.providers[i], &top, named),
            "providers.{name}"
        );
    }
    assert_eq!(
        new.request_timeout,
        p.request_timeout
            .map_or(old.request_timeout, Duration::from_secs_f64)
    );
    assert_eq!(
        new.fallback_enabled_passthrough,
        p.fallback_enabled_passthrough
            .unwrap_or(old.fallback_enabled_passthrough)
    );
    match &p.log_level {
        None => assert_eq!(new.log_level, old.log_level),
        Some(v) => assert_eq!(Some(new.log_level), v.trim().parse::<tracing::Level>().ok()),
    }

    // The diff: every changed field once, nothing unchanged.
    assert!(patch::diff(old, old, &PATCH_NAMES).is_empty());
    let changes = patch::diff(old, &new, &PATCH_NAMES);
    let mut expected: Vec<String> = Vec::new();
    let mut field = |name: String, changed: bool| {
        if changed {
            expected.push(name);
        }
    };
    field(
        "request_timeout".into(),
        old.request_timeout != new.request_timeout,
    );
    field(
        "fallback_enabled_passthrough".into(),
        old.fallback_enabled_passthrough != new.fallback_enabled_passthrough,
    );
    field("log_level".into(), old.log_level != new.log_level);
    let prefixes =
        std::iter::once(String::new()).chain(PATCH_NAMES.iter().map(|n| format!("providers.{n}.")));
    let pairs = std::iter::once((&old.defaults, &new.defaults))
        .chain(old.providers.iter().zip(&new.providers));
    for (prefix, (a, b)) in prefixes.zip(pairs) {
        field(format!("{prefix}rate_rpm"), a.rate_rpm != b.rate_rpm);
        field(
            format!("{prefix}bucket_capacity"),
            a.bucket_capacity != b.bucket_capacity,
        );
        field(
            format!("{prefix}queue_max_size"),
            a.queue_max_size != b.queue_max_size,
        );
        field(
            format!("{prefix}low_priority_timeout"),
            a.low_priority_timeout != b.low_priority_timeout,
        );
        field(
            format!("{prefix}tokens_per_minute"),
            a.tokens_per_minute != b.tokens_per_minute,
        );
    }
    let listed: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(listed, expected, "diff lists each changed field once");
    for c in &changes {
        assert_ne!(c.old, c.new, "{}: a change that changes nothing", c.field);
    }
}

/// The TOML configuration file: [`crate::config::FileConfig::parse`], then
/// [`crate::config::Config::build`] over the built-in defaults with an empty
/// environment. Non-UTF-8 input goes through `String::from_utf8_lossy` (the loader
/// itself refuses it before parsing).
///
/// Checks: every error renders as one line; a built configuration has at least one
/// provider, a valid default provider index, unique names and every provider's values
/// within the accepted ranges (the token budget's too: a window's tokens exactly when
/// `tokens_per_minute` is set).
///
/// `upstream_ca_file` is cleared before the build so the fuzzer cannot make the loader
/// read arbitrary files (`/dev/zero`) from the machine.
pub fn config_toml(data: &[u8]) {
    match std::str::from_utf8(data) {
        Ok(text) => config_text(text),
        Err(_) => config_text(&String::from_utf8_lossy(data)),
    }
}

fn one_line(e: &crate::config::ConfigError) {
    let s = e.to_string();
    assert!(
        !s.contains('\n') && !s.contains('\r'),
        "a configuration error spans lines: {s:?}"
    );
}

fn config_text(text: &str) {
    use crate::config::{FileConfig, Settings};
    let mut file = match FileConfig::parse(text, "fuzz.toml") {
        Ok(f) => f,
        Err(e) => return one_line(&e),
    };
    // Never let the fuzzer make the loader read files (`/dev/zero` as a CA bundle).
    file.settings.upstream_ca_file = None;
    file.settings.redis_url_file = None;
    file.settings.redis_password_file = None;
    let env: HashMap<String, String> = HashMap::new();
    let config = match crate::config::from_file(&file, &env, Settings::default()) {
        Ok(c) => c,
        Err(e) => return one_line(&e),
    };
    assert!(!config.providers.is_empty(), "no provider");
    assert!(
        config.default_provider < config.providers.len(),
        "default_provider {} of {}",
        config.default_provider,
        config.providers.len()
    );
    if !file.providers.is_empty() {
        assert_eq!(config.providers.len(), file.providers.len());
    }
    for (i, p) in config.providers.iter().enumerate() {
        assert!(
            p.rate_rpm.is_finite() && p.rate_rpm > 0.0 && p.rate_rpm <= 6_000_000.0,
            "providers[{i}].rate_rpm {}",
            p.rate_rpm
        );
        assert!(p.bucket_capacity >= 1, "providers[{i}].bucket_capacity 0");
        let t = p.low_priority_timeout.as_secs_f64();
        assert!(
            (0.0009..=86_400.0).contains(&t),
            "providers[{i}].low_priority_timeout {t}"
        );
        assert!(
            p.tokens_per_minute <= 10_000_000_000,
            "providers[{i}].tokens_per_minute {}",
            p.tokens_per_minute
        );
        assert_eq!(
            p.tokens_per_window().is_some(),
            p.tokens_per_minute > 0,
            "providers[{i}]: a token budget exactly when tokens_per_minute is set"
        );
        let bpt = p.token_rules.bytes_per_token.as_f64();
        assert!(
            (1.0..=8.0).contains(&bpt),
            "providers[{i}].bytes_per_token {bpt}"
        );
        assert!(
            (1..=1_000_000).contains(&p.token_rules.default_completion),
            "providers[{i}].default_completion_tokens {}",
            p.token_rules.default_completion
        );
        assert!(!p.name.is_empty(), "providers[{i}] has no name");
        assert!(
            config.providers[..i].iter().all(|o| o.name != p.name),
            "duplicate provider name {:?}",
            p.name
        );
    }
    assert_eq!(config.client_priorities.len(), file.client_priorities.len());
    let _ = crate::hot::Hot::of(&config);
}

/// The `X-Priority` header: [`crate::priority::Priority::parse`].
///
/// Checks: a parsed priority round-trips through its name; a refusal is one line that
/// says what is accepted.
pub fn priority_header(data: &[u8]) {
    use crate::priority::Priority;
    match Priority::parse(data) {
        Ok(p) => {
            assert_eq!(Priority::parse(p.as_str().as_bytes()), Ok(p), "round trip");
            assert_eq!(p.to_string(), p.as_str());
        }
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n') && !s.contains('\r'), "multi-line: {s:?}");
            assert!(s.contains("expected high, normal or low"), "{s}");
            assert!(e.value.chars().count() <= 64, "value not capped");
        }
    }
}

/// An upstream's answer as the HTTP/1.1 client reads it: the head
/// ([`crate::upstream::h1::head::parse`]) and a chunked body
/// ([`crate::http1::chunked::Decoder`]), fed in pieces.
///
/// The first byte picks the size of the pieces (1 to 64) and whether the request was a
/// `HEAD`; the rest is what the upstream sent. Checks: no hop-by-hop header reaches
/// the client's map; the body never yields more bytes than were sent; the same bytes
/// cut into other pieces decode to the same body and the same end.
pub fn upstream_response(data: &[u8]) {
    use crate::upstream::h1::head::{self, Framing};
    let Some((&knob, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(knob % 64) + 1;
    let head_request = knob & 0x80 != 0;
    let maps = crate::http1::Maps::default();
    let read = |step: usize| -> Option<(Framing, Vec<u8>, bool)> {
        let mut buf = bytes::BytesMut::new();
        let mut pieces = wire.chunks(step);
        // The head, skipping interim answers as the client does.
        let head = loop {
            match head::parse(&mut buf, head_request, &maps) {
                Ok(Some(h)) if h.status.is_informational() => continue,
                Ok(Some(h)) => break h,
                Ok(None) => buf.extend_from_slice(pieces.next()?),
                Err(e) => {
                    assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
                    return None;
                }
            }
        };
        for name in head.headers.keys() {
            assert!(
                !head::is_hop_by_hop(name.as_str().as_bytes()),
                "hop-by-hop {name} passed"
            );
        }
        let mut body = Vec::new();
        let mut decoder = crate::http1::chunked::Decoder::default();
        let done = loop {
            match head.framing {
                Framing::Empty => break true,
                Framing::Length(n) => {
                    let take = (n - body.len() as u64).min(buf.len() as u64) as usize;
                    body.extend_from_slice(&buf.split_to(take));
                    if body.len() as u64 == n {
                        break true;
                    }
                }
                Framing::Close => body.extend_from_slice(&buf.split()),
                Framing::Chunked => {
                    if let Some(done) = chunked_step(&mut decoder, &mut buf, &mut body) {
                        break done;
                    }
                }
            }
            match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => break head.framing == Framing::Close,
            }
        };
        assert!(body.len() <= wire.len(), "more body than bytes sent");
        Some((head.framing, body, done))
    };
    let cut = read(step);
    let whole = read(wire.len().max(1));
    assert_eq!(cut, whole, "the pieces changed the answer");
}

/// A client's request as the HTTP/1 server reads it: the head
/// ([`crate::server::h1::head::parse`], parsed again as the server does only when
/// [`crate::server::h1::head::may_end`] says a piece may end it) and a chunked body,
/// fed in pieces.
///
/// The first byte picks the size of the pieces (1 to 64); the rest is what the client
/// sent. Checks: a refusal is a 400, 431 or 501 with a one-line message; an accepted
/// head ends with an empty line the server would have seen; a chunked body's length
/// header is gone; HTTP/1.0 keeps the connection only when asked; the same bytes cut
/// into other pieces give the same head, body and end (a refused head may be refused
/// otherwise, or wait for its timeout).
pub fn client_request(data: &[u8]) {
    use crate::server::h1::head::{self, Framing, HeadLimits};
    let Some((&knob, wire)) = data.split_first() else {
        return;
    };
    let step = usize::from(knob % 64) + 1;
    let limits = HeadLimits {
        max_headers: 16,
        max_head_bytes: 2048,
    };
    type Read = (String, Framing, bool, Vec<u8>, bool);
    let maps = crate::http1::Maps::default();
    let read = |step: usize| -> Option<Result<Read, u16>> {
        let mut buf = bytes::BytesMut::new();
        let mut pieces = wire.chunks(step);
        let head = loop {
            let piece = pieces.next()?;
            let from = buf.len().saturating_sub(3);
            buf.extend_from_slice(piece);
            if !head::may_end(&buf[from..]) && buf.len() < limits.max_head_bytes {
                continue;
            }
            let all = buf.clone().freeze();
            match head::parse(&all, &limits, &maps) {
                Ok(Some(h)) => {
                    let _ = buf.split_to(h.len);
                    assert!(
                        head::may_end(&all[h.len.saturating_sub(3)..h.len]),
                        "unseen end"
                    );
                    break h;
                }
                Ok(None) => {}
                Err(r) => {
                    assert!([400, 431, 501].contains(&r.status.as_u16()), "{r:?}");
                    assert!(!r.message.contains('\n'), "multi-line: {r:?}");
                    return Some(Err(r.status.as_u16()));
                }
            }
        };
        let req = &head.request;
        if head.framing == Framing::Chunked {
            assert!(req.headers().get("content-length").is_none());
        }
        if req.version() == http::Version::HTTP_10 {
            let asked = req.headers().get_all("connection").iter().any(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .to_ascii_lowercase()
                    .contains("keep-alive")
            });
            assert!(!head.keep_alive || asked, "HTTP/1.0 kept without asking");
        }
        let mut body = Vec::new();
        let mut decoder = crate::http1::chunked::Decoder::default();
        let done = loop {
            match head.framing {
                Framing::Length(n) => {
                    let take = (n - body.len() as u64).min(buf.len() as u64) as usize;
                    body.extend_from_slice(&buf.split_to(take));
                    if body.len() as u64 == n {
                        break true;
                    }
                }
                Framing::Chunked => {
                    if let Some(done) = chunked_step(&mut decoder, &mut buf, &mut body) {
                        break done;
                    }
                }
            }
            match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => break false,
            }
        };
        assert!(body.len() <= wire.len(), "more body than bytes sent");
        let summary = format!(
            "{} {} {:?} {:?}",
            req.method(),
            req.uri(),
            req.version(),
            req.headers()
        );
        Some(Ok((summary, head.framing, head.keep_alive, body, done)))
    };
    let cut = read(step);
    let whole = read(wire.len().max(1));
    match (&whole, &cut) {
        // A malformed head in pieces is parsed again only at an empty line (or the
        // byte bound): one that never comes leaves it to the header read timeout.
        (Some(Err(_)), None) => {}
        // A refusal may differ in kind: past the byte bound in pieces is a 431 where
        // the whole head shows a malformed byte further on.
        (Some(Err(_)), Some(Err(_))) => {}
        _ => assert_eq!(cut, whole, "the pieces changed the request"),
    }
}

/// Decodes what `buf` holds of a chunked body into `body`: `Some(true)` at its end,
/// `Some(false)` when it is broken, `None` when more bytes are needed.
fn chunked_step(
    decoder: &mut crate::http1::chunked::Decoder,
    buf: &mut bytes::BytesMut,
    body: &mut Vec<u8>,
) -> Option<bool> {
    use crate::http1::chunked::Step;
    loop {
        match decoder.decode(buf) {
            Ok(Step::Data(d)) => body.extend_from_slice(&d),
            Ok(Step::Done) => return Some(true),
            Ok(Step::More) => return None,
            Err(_) => return Some(false),
        }
    }
}

/// The token budget's readers: a request body's token fields ([`crate::tokens::read`])
/// and their estimates, a JSON answer's usage, and the same bytes as an event stream
/// ([`crate::tokens::UsageScanner`]) fed in pieces.
///
/// Checks: the model is at most 256 bytes; a body read by its length counts all of it
/// as text; every estimate, for every endpoint and factor, holds at least the token
/// ids; the stream's events are in order within it, the scanner's usage is the last
/// event's; the same bytes cut into pieces of each size from 1 to 64 give the same
/// events, usage and end as whole.
pub fn token_fields(data: &[u8]) {
    use crate::tokens::{self, Basis, Endpoint, Factor, Rules, UsageScanner};
    let fields = tokens::read(data);
    let model = fields.model.as_deref().map_or(0, str::len);
    assert!(
        model <= tokens::request::MODEL_MAX,
        "model of {model} bytes"
    );
    assert!(fields.n >= 1 && fields.prompts >= 1);
    match fields.basis {
        Basis::BodyLength => assert_eq!(fields.text_bytes, data.len() as u64),
        Basis::Fields => assert!(fields.token_ids <= data.len() as u64),
    }
    let rules = Rules::default();
    for endpoint in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Other,
    ] {
        for factor in [Factor::ONE, Factor::MAX] {
            let e = rules.estimate(&fields, endpoint, factor);
            assert!(e.prompt >= fields.token_ids, "{e:?} under {fields:?}");
            assert!(e.prompt >= e.ratio_base.unwrap_or(0));
        }
    }
    let _ = tokens::usage::from_json(data);

    let scan = |step: usize| {
        let mut s = UsageScanner::new();
        let mut events = Vec::new();
        for piece in data.chunks(step) {
            s.feed(piece, |e| events.push(e));
        }
        s.finish(|e| events.push(e));
        (events, s.usage(), s.done())
    };
    let whole = scan(data.len().max(1));
    let mut last = 0;
    for e in &whole.0 {
        assert!(last <= e.start && e.start < e.end, "{e:?} after {last}");
        last = e.end;
    }
    assert!(last <= data.len() as u64);
    let last_usage = whole.0.iter().rev().find_map(|e| e.usage);
    assert_eq!(whole.1, last_usage);
    for step in 1..=64 {
        assert_eq!(scan(step), whole, "pieces of {step}");
    }
}
