//! Response bodies of the simulated upstream, in the shapes OpenAI clients parse.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::admit::WorkerSlot;
use super::{Knobs, MockShared};
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

/// Body of every mock response: whole, or a stream fed by a task; `Held` keeps a worker
/// slot taken until the body ends or is dropped.
pub enum MockBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, BoxError>>),
    Held(Box<MockBody>, WorkerSlot),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            MockBody::Held(body, _) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Held(body, _) => body.is_end_stream(),
            _ => matches!(self, MockBody::Full(None)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            MockBody::Stream(_) => SizeHint::default(),
            MockBody::Held(body, _) => body.size_hint(),
        }
    }
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(MockBody::Full(Some(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "mock_error", "code": status.as_u16()}}),
    )
}

pub fn stats(s: &MockShared) -> Response<MockBody> {
    let st = &s.stats;
    json_response(
        StatusCode::OK,
        &json!({
            "requests": st.requests.load(Ordering::Relaxed),
            "rate_limited": st.rate_limited.load(Ordering::Relaxed),
            "errors": st.errors.load(Ordering::Relaxed),
            "unauthorized": st.unauthorized.load(Ordering::Relaxed),
            "streams": st.streams.load(Ordering::Relaxed),
            "worker_limited": st.worker_limited.load(Ordering::Relaxed),
            "rpm_limit": s.gate.state_at(Instant::now()).global.per_minute(),
            "judging": s.gate.is_judging(),
            "admitted": s.gate.judge.admitted_total(),
            "refused": s.gate.judge.refused_total(),
        }),
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

fn parse(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

pub async fn chat(s: &MockShared, body: &[u8], knobs: &Knobs) -> Response<MockBody> {
    let req = match parse(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let model = req["model"]
        .as_str()
        .unwrap_or("meta/llama-3.1-8b-instruct")
        .to_owned();
    let id = format!("chatcmpl-mock-{:016x}", fastrand::u64(..));
    if req["stream"].as_bool() == Some(true) {
        s.stats.streams.fetch_add(1, Ordering::Relaxed);
        return stream(id, model, knobs.clone());
    }
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let content: String = (0..knobs.tokens).map(|i| WORDS[i % WORDS.len()]).collect();
    let answer = json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": "chat.completion",
            "created": now_secs(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": body.len() / 4,
                "completion_tokens": knobs.tokens,
                "total_tokens": body.len() / 4 + knobs.tokens
            }
        }),
    );
    match knobs.reset_after {
        Some(_) => cut_short(answer),
        None => answer,
    }
}

/// The same response with its declared length, but the connection resets halfway.
fn cut_short(resp: Response<MockBody>) -> Response<MockBody> {
    let (mut parts, body) = resp.into_parts();
    let MockBody::Full(Some(full)) = body else {
        return Response::from_parts(parts, body);
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full.len()));
    let (tx, rx) = mpsc::channel(2);
    let half = full.slice(..full.len() / 2);
    tokio::task::spawn_local(async move {
        let _ = tx.send(Ok(half)).await;
        reset(&tx, "simulated reset mid-body").await;
    });
    Response::from_parts(parts, MockBody::Stream(rx))
}

fn chunk(id: &str, model: &str, created: u64, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

/// An SSE completion: role chunk, one chunk per token, a final chunk, `[DONE]`.
fn stream(id: String, model: String, knobs: Knobs) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_local(async move {
        let created = now_secs();
        let mut frames = Vec::with_capacity(knobs.tokens + 3);
        frames.push(chunk(
            &id,
            &model,
            created,
            json!({"role": "assistant", "content": ""}),
            None,
        ));
        for i in 0..knobs.tokens {
            frames.push(chunk(
                &id,
                &model,
                created,
                json!({"content": WORDS[i % WORDS.len()]}),
                None,
            ));
        }
        frames.push(chunk(&id, &model, created, json!({}), Some("stop")));
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for (n, frame) in frames.into_iter().enumerate() {
            if knobs.reset_after == Some(n) {
                reset(&tx, "simulated reset mid-stream").await;
                return;
            }
            let wait = if n == 0 {
                knobs.latency
            } else if n <= knobs.tokens {
                knobs.token_delay
            } else {
                Duration::ZERO
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if tx.send(Ok(frame)).await.is_err() {
                return; // client gone
            }
        }
    });
    let mut r = Response::new(MockBody::Stream(rx));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub async fn embeddings(body: &[u8], knobs: &Knobs) -> Response<MockBody> {
    let req = match parse(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
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
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": req["model"].as_str().unwrap_or("nvidia/nv-embedqa-e5-v5"),
            "usage": {"prompt_tokens": body.len() / 4, "total_tokens": body.len() / 4}
        }),
    )
}

/// Fails the body after what was sent has left: hyper discards unflushed output when a
/// body fails, and it flushes while the body is pending.
async fn reset(tx: &mpsc::Sender<Result<Bytes, BoxError>>, why: &'static str) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = tx.send(Err(why.into())).await;
}
