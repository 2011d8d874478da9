//! The live dashboard, on the proxy's listener:
//!
//! - `GET /api/dashboard`: the page (embedded; no CDN, no build step);
//! - `GET /api/dashboard/snapshot`: the latest snapshot as JSON;
//! - `GET /api/dashboard/stream`: Server-Sent Events, one frame per published snapshot
//!   (`retry: 3000` first), ending cleanly when the sidecar starts draining.
//!
//! Every stream reads the one seqlock-published snapshot. A worker encodes each
//! sequence once ([`FrameCache`]) and all its streams send those same bytes, so a
//! thousand clients cost one build per tick and one encoding per worker.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytemuck::Zeroable;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;

pub mod json;
mod publisher;

pub use publisher::Publisher;

use crate::app::App;
use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::reply::Reply;
use crate::snapshot::{ClientGuard, Snapshot};

const PAGE: &str = include_str!("page.html");

/// The latest encoded snapshot on one worker.
#[derive(Default)]
pub struct FrameCache {
    cached: RefCell<Option<(u64, Bytes)>>,
    scratch: RefCell<Option<Box<Snapshot>>>,
}

impl FrameCache {
    /// The JSON of the latest snapshot and its sequence, encoded at most once per
    /// sequence on this worker.
    pub fn latest(&self, app: &App) -> (u64, Bytes) {
        let hub = &app.snapshots;
        let seq = hub.sequence();
        if let Some((s, b)) = &*self.cached.borrow() {
            if *s == seq {
                return (*s, b.clone());
            }
        }
        let mut scratch = self.scratch.borrow_mut();
        let snap = scratch.get_or_insert_with(|| Box::new(Snapshot::zeroed()));
        let seq = hub.read_into(snap);
        let bytes = Bytes::from(json::encode(app, snap, seq));
        *self.cached.borrow_mut() = Some((seq, bytes.clone()));
        (seq, bytes)
    }
}

/// Routes `/api/dashboard*`; `None` for other paths.
pub fn serve(
    app: &Arc<App>,
    frames: &Rc<FrameCache>,
    method: &Method,
    path: &str,
) -> Option<Response<ProxyBody>> {
    let route = match path {
        "/api/dashboard" | "/api/dashboard/" => Route::Page,
        "/api/dashboard/snapshot" => Route::Snapshot,
        "/api/dashboard/stream" => Route::Stream,
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some(
            ProxyError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_owned(),
            }
            .into_response(),
        );
    }
    Some(match route {
        Route::Page => respond(
            "text/html; charset=utf-8",
            ProxyBody::full(Bytes::from_static(PAGE.as_bytes())),
        ),
        Route::Snapshot => {
            let (_, json) = frames.latest(app);
            respond("application/json", ProxyBody::full(json))
        }
        Route::Stream => {
            let mut resp = respond(
                "text/event-stream",
                ProxyBody::stream(SseStream::new(Arc::clone(app), Rc::clone(frames))),
            );
            resp.headers_mut()
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
            resp
        }
    })
}

enum Route {
    Page,
    Snapshot,
    Stream,
}

fn respond(content_type: &'static str, body: ProxyBody) -> Response<ProxyBody> {
    Reply::new(StatusCode::OK, content_type, body)
        .no_store()
        .header(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        )
        .into_response()
}

/// One dashboard client's event stream.
struct SseStream {
    app: Arc<App>,
    frames: Rc<FrameCache>,
    ticks: WatchStream<u64>,
    draining: Pin<Box<WaitForCancellationFutureOwned>>,
    first: bool,
    last_seq: u64,
    _client: ClientGuard,
}

impl SseStream {
    fn new(app: Arc<App>, frames: Rc<FrameCache>) -> Self {
        let hub = &app.snapshots;
        Self {
            ticks: WatchStream::new(hub.subscribe()),
            draining: Box::pin(app.shutdown.draining.clone().cancelled_owned()),
            first: true,
            last_seq: u64::MAX,
            _client: hub.client(),
            app,
            frames,
        }
    }

    fn frame(&mut self) -> Option<Bytes> {
        let (seq, json) = self.frames.latest(&self.app);
        // 0: nothing published yet; the publisher's first tick is moments away.
        if seq == 0 || seq == self.last_seq {
            return None;
        }
        self.last_seq = seq;
        let mut out = BytesMut::with_capacity(json.len() + 48);
        if std::mem::take(&mut self.first) {
            out.put_slice(b"retry: 3000\n");
        }
        out.put_slice(format!("id: {seq}\ndata: ").as_bytes());
        out.put_slice(&json);
        out.put_slice(b"\n\n");
        Some(out.freeze())
    }
}

impl Body for SseStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.draining.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.ticks).poll_next(cx) {
                Poll::Ready(Some(_)) => {
                    if let Some(frame) = self.frame() {
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
