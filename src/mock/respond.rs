//! Response bodies of the simulated upstream, in the shapes OpenAI clients parse.
//!
//! Every JSON chat completion and embedding carries `usage` with the mock's own counts
//! (`count.rs`). A stream sends usage only when asked (`stream_options.include_usage`),
//! as OpenAI does: then every chunk carries `"usage": null` and one more chunk, with
//! `choices: []` and the whole `usage`, comes before `data: [DONE]`. `n` choices are
//! generated (a stream interleaves them per token), each its token knob capped by
//! `max_tokens`, ending `"length"` when the cap cut it short. Under `actual` charging, the
//! answer's [`Meter`] is charged before its last bytes leave: a client that has read the
//! whole answer finds it in the window.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Either, Full, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::admit::Meter;
use super::count::Ask;
use super::knobs::Knobs;
use super::stats::MockStats;
use crate::body::BoxError;

const WORDS: &[&str] = &[
    "The",
    " sidecar",
    " paces",
    " requests",
    " so",
    " the",
    " provider",
    " never",
    " has",
    " to",
    " refuse",
    " them",
    ".",
];

/// Body of every mock response: whole, or a stream fed by a task.
pub type MockBody = Either<Full<Bytes>, StreamBody<ReceiverStream<Result<Frame<Bytes>, BoxError>>>>;

/// What a streaming answer's task sends: a chunk, or the error that ends the body.
type Chunks = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A streaming body and the sender its task feeds, holding at most `buffer` chunks.
fn channel(buffer: usize) -> (Chunks, MockBody) {
    let (tx, rx) = mpsc::channel(buffer);
    (tx, Either::Right(StreamBody::new(ReceiverStream::new(rx))))
}

/// A JSON answer with `status`; its body is `body`.
fn json_headers(status: StatusCode, body: MockBody) -> Response<MockBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    json_headers(status, Either::Left(Full::new(Bytes::from(v.to_string()))))
}

pub fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "mock_error", "code": status.as_u16()}}),
    )
}

pub fn models() -> Response<MockBody> {
    let ids = [
        "meta/llama-3.1-8b-instruct",
        "meta/llama-3.1-70b-instruct",
        "nvidia/llama-3.1-nemotron-70b-instruct",
        "nvidia/nv-embedqa-e5-v5",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": id.split('/').next()}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request body as JSON, or the message of the 400 it gets.
pub(super) fn parse(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The 400 a model that refuses `stream_options` gives (OpenAI's wording for a field it
/// does not know).
pub fn stream_options_refused() -> Response<MockBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": "stream_options",
            "code": null,
        }}),
    )
}

/// What a chat answer generates, from the request and the knobs.
#[derive(Debug, Clone, Copy)]
struct Plan {
    prompt: u64,
    per_choice: usize,
    n: usize,
    finish: &'static str,
    include_usage: bool,
}

impl Plan {
    fn new(ask: &Ask, knobs: &Knobs) -> Self {
        Self {
            prompt: ask.prompt,
            // At most the knob, itself at most 100,000.
            per_choice: ask.per_choice(knobs.tokens) as usize,
            n: ask.n as usize,
            finish: if ask.capped(knobs.tokens) {
                "length"
            } else {
                "stop"
            },
            include_usage: ask.include_usage,
        }
    }

    fn completion(&self) -> u64 {
        (self.per_choice as u64).saturating_mul(self.n as u64)
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion(),
            "total_tokens": self.prompt.saturating_add(self.completion())
        })
    }
}

/// A chat completion for the parsed request `req` (its [`Ask`] read from it).
pub async fn chat(
    stats: &MockStats,
    req: &Result<Value, String>,
    ask: &Ask,
    knobs: &Knobs,
    meter: Option<Meter>,
) -> Response<MockBody> {
    let req = match req {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let model = req["model"]
        .as_str()
        .unwrap_or("meta/llama-3.1-8b-instruct")
        .to_owned();
    let id = format!("chatcmpl-mock-{:016x}", fastrand::u64(..));
    let plan = Plan::new(ask, knobs);
    if req["stream"].as_bool() == Some(true) {
        stats.streams.fetch_add(1, Ordering::Relaxed);
        return stream(id, model, knobs.clone(), plan, meter);
    }
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let content: String = (0..plan.per_choice)
        .map(|i| WORDS[i % WORDS.len()])
        .collect();
    let choices: Vec<Value> = (0..plan.n)
        .map(|index| {
            json!({
                "index": index,
                "message": {"role": "assistant", "content": content},
                "finish_reason": plan.finish
            })
        })
        .collect();
    let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": now_secs(),
            "model": model,
            "choices": choices,
            "usage": plan.usage()
    });
    if let Some(mut m) = meter {
        m.add(plan.prompt.saturating_add(plan.completion()));
        m.settle();
    }
    match knobs.reset_after {
        Some(_) => cut_short(&answer),
        None => json_response(StatusCode::OK, &answer),
    }
}

/// `v` as a 200 with its declared length, but the connection resets halfway.
fn cut_short(v: &Value) -> Response<MockBody> {
    let full = Bytes::from(v.to_string());
    let (tx, body) = channel(2);
    let mut resp = json_headers(StatusCode::OK, body);
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full.len()));
    let half = full.slice(..full.len() / 2);
    tokio::task::spawn_local(async move {
        let _ = tx.send(Ok(Frame::data(half))).await;
        reset(&tx, "simulated reset mid-body").await;
    });
    resp
}

/// One SSE chunk; `usage` is added only when the client asked for usage.
fn chunk(id: &str, model: &str, created: u64, choices: Value, usage: Option<Value>) -> Bytes {
    let mut v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    Bytes::from(format!("data: {v}\n\n"))
}

/// What a stream's frame is, for its pacing and its charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    /// A token's chunk; `first` of the choices for that token (the delay goes before it).
    Token {
        first: bool,
    },
    /// After the last token: the finish chunks, the usage chunk, `[DONE]`.
    End,
}

/// An SSE completion: role chunks, one chunk per token and choice, the finish chunks, the
/// usage chunk when asked for, `[DONE]`.
fn stream(
    id: String,
    model: String,
    knobs: Knobs,
    plan: Plan,
    meter: Option<Meter>,
) -> Response<MockBody> {
    let (tx, body) = channel(4);
    tokio::task::spawn_local(async move {
        let mut meter = meter;
        if let Some(m) = meter.as_mut() {
            m.add(plan.prompt);
        }
        let created = now_secs();
        let null = plan.include_usage.then_some(Value::Null);
        let one = |index: usize, delta: Value, finish: Option<&str>| {
            let choice = json!([{"index": index, "delta": delta, "finish_reason": finish}]);
            chunk(&id, &model, created, choice, null.clone())
        };
        let one = &one;
        // Made as they are sent: `n` × the token knob can be millions of chunks.
        let starts = (0..plan.n).map(|index| {
            let role = json!({"role": "assistant", "content": ""});
            (Step::Start, one(index, role, None))
        });
        let tokens = (0..plan.per_choice).flat_map(|i| {
            (0..plan.n).map(move |index| {
                let delta = json!({"content": WORDS[i % WORDS.len()]});
                (Step::Token { first: index == 0 }, one(index, delta, None))
            })
        });
        let ends = (0..plan.n).map(|index| (Step::End, one(index, json!({}), Some(plan.finish))));
        let usage = plan.include_usage.then(|| {
            let usage = chunk(&id, &model, created, json!([]), Some(plan.usage()));
            (Step::End, usage)
        });
        let done = (Step::End, Bytes::from_static(b"data: [DONE]\n\n"));
        let frames = starts
            .chain(tokens)
            .chain(ends)
            .chain(usage)
            .chain(std::iter::once(done));
        for (n, (step, frame)) in frames.into_iter().enumerate() {
            if knobs.reset_after == Some(n) {
                reset(&tx, "simulated reset mid-stream").await;
                return; // the meter, dropped, charges what was sent
            }
            let wait = match step {
                _ if n == 0 => knobs.latency,
                Step::Token { first: true } => knobs.token_delay,
                _ => Duration::ZERO,
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if step == Step::End {
                if let Some(m) = meter.take() {
                    m.settle();
                }
            }
            if tx.send(Ok(Frame::data(frame))).await.is_err() {
                return; // client gone
            }
            if let (Step::Token { .. }, Some(m)) = (step, meter.as_mut()) {
                m.add(1);
            }
        }
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Embeddings for the parsed request `req`; usage is its prompt count.
pub async fn embeddings(
    req: &Result<Value, String>,
    ask: &Ask,
    knobs: &Knobs,
    meter: Option<Meter>,
) -> Response<MockBody> {
    let req = match req {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array of strings",
            )
        }
    };
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // Deterministic vector from the text, so equal inputs embed equally.
            let mut seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let v: Vec<f64> = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed % 2000) as f64 / 1000.0) - 1.0
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    if let Some(mut m) = meter {
        m.add(ask.prompt);
        m.settle();
    }
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": req["model"].as_str().unwrap_or("nvidia/nv-embedqa-e5-v5"),
            "usage": {"prompt_tokens": ask.prompt, "total_tokens": ask.prompt}
        }),
    )
}

/// Fails the body after what was sent has left: hyper discards unflushed output when a
/// body fails, and it flushes while the body is pending.
async fn reset(tx: &Chunks, why: &'static str) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = tx.send(Err(why.into())).await;
}
