//! The token side of a `/v1/` request, when its provider has a token budget
//! (`tokens_per_minute`): the estimate admission reserves ([`price`]), and the
//! settlement from the answer's `usage` when its body ends ([`Settle`]).
//!
//! The estimate is read from the body the proxy already holds (`crate::tokens`: text
//! fields, images by their own rule, the completion bound), corrected per model by what
//! settled usage taught. The reservation rides with the request's claim, is dated when
//! the request is written upstream, and travels with the answer's body
//! ([`Settlement`]): a JSON answer's `usage` is read once the body is whole, a stream's
//! from its usage chunk as it passes. Whatever ends the body settles it once: with the
//! usage seen, else the estimate stays charged. Without a budget none of this runs: no
//! body is read for tokens, nothing is carried.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::app::{App, Provider};
use crate::config::TokenCharge;
use crate::limiter::{Charge, Cost, Limiter, Settlement, Usage};
use crate::tokens::{self, Endpoint, Estimate, EventKind, UsageScanner};

/// Most bytes of a JSON answer kept to read its `usage` (a larger answer settles at its
/// estimate).
const JSON_KEPT: usize = 4 << 20;

/// A request's token estimate, and which limiter's budget it is reserved in.
#[derive(Debug, Clone)]
pub struct Priced {
    pub cost: Cost,
    pub estimate: Estimate,
    /// Reserved in the model's limiter (limits per model), not the key's.
    pub on_model: bool,
    /// The model whose estimates its settled usage corrects ("" when none is named).
    pub model: String,
    /// The request asks for a stream, and whether it asks for its usage chunk.
    pub stream: bool,
    pub include_usage: bool,
}

/// The estimate of the request whose body is `body` (sent to `path`, for `model`), when
/// the limiter that admits it has a token budget; `None` otherwise (boxed: without a
/// budget, the request path carries one word for it).
#[inline]
pub fn price(
    provider: &Provider,
    scope: Option<&Limiter>,
    body: &Bytes,
    path: &str,
    model: Option<&str>,
) -> Option<Box<Priced>> {
    let on_model = scope.is_some_and(|m| m.token_budget().is_some());
    if !on_model && provider.limiter.token_budget().is_none() {
        return None;
    }
    Some(Box::new(estimate(provider, on_model, body, path, model)))
}

#[cold]
fn estimate(
    provider: &Provider,
    on_model: bool,
    body: &Bytes,
    path: &str,
    model: Option<&str>,
) -> Priced {
    let fields = tokens::read(body);
    let model = model.or(fields.model.as_deref()).unwrap_or("").to_owned();
    let factor = provider
        .token_ratios
        .as_ref()
        .map_or(tokens::Factor::ONE, |t| t.factor(&model));
    let estimate = provider
        .config
        .token_rules
        .estimate(&fields, Endpoint::from_path(path), factor);
    Priced {
        cost: Cost {
            prompt: estimate.prompt,
            completion: estimate.completion,
        },
        estimate,
        on_model,
        model,
        stream: fields.stream,
        include_usage: fields.include_usage,
    }
}

/// Whether the sidecar asks for the usage chunk of this stream on the client's behalf
/// (`request_usage`): a streamed request that did not ask, to a model not known to
/// refuse the field.
pub fn asks_usage(provider: &Provider, priced: &Priced) -> bool {
    provider.config.request_usage
        && priced.stream
        && !priced.include_usage
        && !provider.refuses_usage(&priced.model)
}

/// `body` (a JSON object) with `stream_options.include_usage` set; `None` when it is
/// not a JSON object. Spliced in after the opening brace when the body has no
/// `stream_options` (the usual case: no parse), else the object is rewritten.
pub fn with_include_usage(body: &Bytes) -> Option<Bytes> {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let at = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[at] != b'{' {
        return None;
    }
    if memchr::memmem::find(body, b"stream_options").is_none() {
        let rest = &body[at + 1..];
        let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
        let mut out = Vec::with_capacity(body.len() + FIELD.len() + 1);
        out.extend_from_slice(&body[..=at]);
        out.extend_from_slice(FIELD);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Some(Bytes::from(out));
    }
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    opts["include_usage"] = serde_json::Value::Bool(true);
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// How the provider charges, in the limiter's terms.
pub fn charge_of(c: TokenCharge) -> Charge {
    match c {
        TokenCharge::Reserved => Charge::Reserved,
        TokenCharge::Actual => Charge::Actual,
    }
}

/// Settles a request's reservation when its answer's body ends.
pub struct Settle {
    app: Arc<App>,
    provider: usize,
    settlement: Settlement,
    estimate: Estimate,
    model: String,
    usage: UsageFrom,
}

/// Where the answer's usage is read from.
enum UsageFrom {
    /// An event stream: its usage chunk, found as the stream passes.
    Stream(Box<Stream>),
    /// A JSON answer: its frames (shared, not copied), read once whole; `None` past
    /// [`JSON_KEPT`] bytes.
    Json(Option<Vec<Bytes>>, usize),
}

impl Settle {
    pub fn new(
        app: Arc<App>,
        provider: usize,
        settlement: Settlement,
        priced: Priced,
        sse: bool,
        strip_usage: bool,
    ) -> Self {
        Self {
            app,
            provider,
            settlement,
            estimate: priced.estimate,
            model: priced.model,
            usage: if sse {
                UsageFrom::Stream(Box::new(Stream {
                    scanner: UsageScanner::new(),
                    strip: strip_usage.then(Strip::default),
                    finished: false,
                }))
            } else {
                UsageFrom::Json(Some(Vec::new()), 0)
            },
        }
    }

    /// A piece of the answer's body on its way to the client, and what of it goes on:
    /// all of it, unless the sidecar asked for a usage chunk the client did not, which
    /// is cut out (the bytes of an event not ended yet wait for its end).
    pub fn pass(&mut self, data: Bytes) -> Bytes {
        match &mut self.usage {
            UsageFrom::Stream(s) => s.pass(data),
            UsageFrom::Json(frames, len) => {
                // Kept (shared, not copied) to read `usage` once the body is whole.
                *len += data.len();
                match frames {
                    Some(f) if *len <= JSON_KEPT => f.push(data.clone()),
                    _ => *frames = None,
                }
                data
            }
        }
    }

    /// The stream ended: what it still held back (without a usage chunk to cut).
    pub fn flush(&mut self) -> Option<Bytes> {
        match &mut self.usage {
            UsageFrom::Stream(s) => s.flush(),
            UsageFrom::Json(..) => None,
        }
    }

    /// The body ended (however it ended): the reservation becomes what the provider
    /// counted, from the usage seen (else the estimate stays), and the counters and the
    /// model's correction learn from it.
    pub fn end(self) {
        let Settle {
            app,
            provider,
            settlement,
            estimate,
            model,
            usage,
        } = self;
        let usage = match usage {
            UsageFrom::Stream(mut s) => {
                s.flush();
                s.scanner.usage()
            }
            UsageFrom::Json(Some(frames), _) => match frames.as_slice() {
                [one] => tokens::usage::from_json(one),
                many => tokens::usage::from_json(&many.concat()),
            },
            UsageFrom::Json(None, _) => None,
        };
        let p = &app.providers[provider];
        let settled = settlement.settle(
            usage.map(|u| Usage {
                prompt: u.prompt,
                completion: u.completion,
            }),
            charge_of(p.config.token_charge),
            app.clock.now_nanos(),
        );
        p.stats.settle_tokens(
            settled.estimate,
            settled.settled,
            usage.map(|u| (u.prompt, u.completion)),
        );
        if let (Some(u), Some(table)) = (usage, &p.token_ratios) {
            table.observe(&model, &estimate, u.prompt);
        }
    }
}

/// An event stream on its way: its usage read, and (`strip`) the usage chunk the
/// sidecar asked for cut out.
struct Stream {
    scanner: UsageScanner,
    strip: Option<Strip>,
    finished: bool,
}

/// The bytes held back while an event that may be cut has not ended, and the spans cut.
#[derive(Default)]
struct Strip {
    held: BytesMut,
    /// Stream offset of `held`'s first byte.
    from: u64,
    /// Spans `[start, end)` of usage chunks to cut, not yet passed.
    cut: Vec<(u64, u64)>,
}

/// Most bytes held back for one event: a longer one is no usage chunk, and cutting
/// stops (everything held goes on).
const HELD_MAX: usize = 2 * tokens::sse::MAX_LINE;

impl Stream {
    fn pass(&mut self, data: Bytes) -> Bytes {
        let Self { scanner, strip, .. } = self;
        let Some(st) = strip.as_mut() else {
            scanner.feed(&data, |_| {});
            return data;
        };
        scanner.feed(&data, |e| {
            if e.kind == EventKind::UsageOnly {
                st.cut.push((e.start, e.end));
            }
        });
        if st.held.is_empty() && st.cut.is_empty() && scanner.pending_since().is_none() {
            // Nothing held, nothing to cut: the piece goes on as it came.
            st.from += data.len() as u64;
            return data;
        }
        st.held.extend_from_slice(&data);
        let end = st.from + st.held.len() as u64;
        if st.held.len() > HELD_MAX {
            let all = st.take(end);
            *strip = None;
            return all;
        }
        st.take(scanner.pending_since().unwrap_or(end).clamp(st.from, end))
    }

    fn flush(&mut self) -> Option<Bytes> {
        if std::mem::replace(&mut self.finished, true) {
            return None;
        }
        let Self { scanner, strip, .. } = self;
        match strip.as_mut() {
            None => {
                scanner.finish(|_| {});
                None
            }
            Some(st) => {
                scanner.finish(|e| {
                    if e.kind == EventKind::UsageOnly {
                        st.cut.push((e.start, e.end));
                    }
                });
                let end = st.from + st.held.len() as u64;
                let rest = st.take(end);
                (!rest.is_empty()).then_some(rest)
            }
        }
    }
}

impl Strip {
    /// The held bytes up to stream offset `until`, without the spans to cut.
    fn take(&mut self, until: u64) -> Bytes {
        let n = (until - self.from) as usize;
        let chunk = self.held.split_to(n).freeze();
        let start = self.from;
        self.from = until;
        if self.cut.is_empty() {
            return chunk;
        }
        let mut out = BytesMut::with_capacity(chunk.len());
        let mut at = start;
        self.cut.retain(|&(a, b)| {
            if a >= until {
                return true;
            }
            let (a, b) = (a.max(at), b.min(until));
            if a > at {
                out.extend_from_slice(&chunk[(at - start) as usize..(a - start) as usize]);
            }
            at = at.max(b);
            false
        });
        out.extend_from_slice(&chunk[(at - start) as usize..]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_spliced_in_or_set() {
        let b = |s: &str| {
            with_include_usage(&Bytes::from(s.to_owned()))
                .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
        };
        let v = b(r#"{"model":"m","stream":true}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert_eq!(b(" {}").unwrap()["stream_options"]["include_usage"], true);
        let v = b(r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1, "other options kept");
        assert!(b("[1]").is_none() && b("not json").is_none());
    }

    /// A stream of two content chunks, the usage chunk and [DONE].
    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
        data: [DONE]\n\n";

    fn run(step: usize, strip: bool) -> (String, Option<tokens::Usage>) {
        let mut s = Stream {
            scanner: UsageScanner::new(),
            strip: strip.then(Strip::default),
            finished: false,
        };
        let mut out = Vec::new();
        for piece in STREAM.as_bytes().chunks(step) {
            out.extend_from_slice(&s.pass(Bytes::copy_from_slice(piece)));
        }
        if let Some(rest) = s.flush() {
            out.extend_from_slice(&rest);
        }
        (String::from_utf8(out).unwrap(), s.scanner.usage())
    }

    #[test]
    fn the_usage_chunk_asked_for_the_client_is_cut_out_however_the_stream_is_cut() {
        let usage = Some(tokens::Usage {
            prompt: 7,
            completion: 2,
            total: 9,
        });
        for step in [1, 2, 3, 7, 16, 50, 1000] {
            let (kept, u) = run(step, false);
            assert_eq!(
                (kept.as_str(), u),
                (STREAM, usage),
                "step {step}: untouched"
            );
            let (cut, u) = run(step, true);
            assert_eq!(u, usage, "step {step}: usage still read");
            assert!(!cut.contains("prompt_tokens"), "step {step}: {cut}");
            assert_eq!(cut.matches("data: ").count(), 3, "step {step}: {cut}");
            assert!(cut.ends_with("data: [DONE]\n\n"), "step {step}");
        }
    }
}
