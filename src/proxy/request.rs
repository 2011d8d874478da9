//! The `request` phase: what a request must be before anything is spent on it. Framing
//! (`Host`, absolute form), a method that is forwarded, header limits, the priority
//! (from the client's key, then `x-priority`), and the body: read once, bounded by
//! size and by the request's deadline, and kept as `Bytes` so later phases (routing by
//! model, retries) never read the client again.

use std::collections::HashMap;
use std::pin::Pin;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tokio::time::Sleep;

use super::headers;
use crate::app::App;
use crate::body::BoxError;
use crate::error::ProxyError;
use crate::framing;
use crate::priority::Priority;
use crate::record::Record;

/// Checks the request's head and sets its priority in `record` (then [`read_body`]).
pub fn check(app: &App, parts: &Parts, record: &mut Record) -> Result<(), ProxyError> {
    // One pass over the headers for all that is read of them here; the checks then come
    // in their order (framing, method, limits, priority), so the first to fail answers.
    let head = headers::scan(&parts.headers);
    framing::check_hosts(parts, app.config.listen, head.host, head.more_hosts)?;
    if !framing::forwarded(&parts.method) {
        let method = parts.method.to_string().chars().take(64).collect();
        return Err(ProxyError::MethodNotForwarded { method });
    }
    head.check_limits(&app.config.limits)?;
    if let Some(p) = client_priority(&app.config.client_priorities, &parts.headers) {
        record.priority = p;
    }
    if let Some(v) = head.priority {
        record.priority = Priority::parse(v.as_bytes())?;
    }
    Ok(())
}

/// Reads the whole body, at most `limit` bytes, before `timer` fires. A body that
/// arrives in one frame (most do) is kept as that frame, without buffering a copy.
/// Generic over the body so the phase is tested without a socket.
pub async fn read_body<B>(
    body: &mut B,
    headers: &http::HeaderMap,
    limit: usize,
    mut timer: Pin<&mut Sleep>,
) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    if declared == Some(0) {
        return Ok(Bytes::new());
    }
    let body_error = |e: BoxError| {
        if e.is::<http_body_util::LengthLimitError>() {
            ProxyError::BodyTooLarge { limit }
        } else {
            ProxyError::BadBody { source: e }
        }
    };
    let mut body = Limited::new(body, limit);
    let first = tokio::select! {
        biased;
        f = body.frame() => f,
        _ = &mut timer => return Err(ProxyError::BodyTimeout),
    };
    let first = match first {
        None => return Ok(Bytes::new()),
        Some(Err(e)) => return Err(body_error(e)),
        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
    };
    if body.is_end_stream() {
        return Ok(first);
    }
    let rest = tokio::select! {
        biased;
        r = body.collect() => r.map_err(body_error)?.to_bytes(),
        _ = &mut timer => return Err(ProxyError::BodyTimeout),
    };
    if first.is_empty() {
        return Ok(rest);
    }
    let mut all = bytes::BytesMut::with_capacity(first.len() + rest.len());
    all.extend_from_slice(&first);
    all.extend_from_slice(&rest);
    Ok(all.freeze())
}

/// The default priority of the client's key, if the configuration maps it.
fn client_priority(map: &HashMap<String, Priority>, h: &http::HeaderMap) -> Option<Priority> {
    if map.is_empty() {
        return None;
    }
    let token = h
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    map.get(token).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;
    use http::{HeaderValue, Method};
    use http_body_util::{Full, StreamBody};
    use std::sync::Arc;

    fn app() -> Arc<App> {
        App::new(config("", &[("SIDECAR_MAX_BODY_BYTES", "1024")]))
    }

    fn head(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/v1/chat/completions")
            .header(header::HOST, "localhost");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn record() -> Record {
        Record::new(
            HeaderValue::from_static("id"),
            Method::POST,
            http::Uri::from_static("/v1/chat/completions"),
        )
    }

    /// Runs the phase with a deadline `ms` away.
    fn run<B>(app: &App, parts: &Parts, mut body: B, ms: u64) -> (Result<Bytes, ProxyError>, Record)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut rec = record();
        let r = rt.block_on(async {
            let timer = tokio::time::sleep(std::time::Duration::from_millis(ms));
            tokio::pin!(timer);
            check(app, parts, &mut rec)?;
            let limit = app.config.limits.max_body_bytes;
            read_body(&mut body, &parts.headers, limit, timer).await
        });
        (r, rec)
    }

    #[test]
    fn a_body_is_read_whole_and_the_priority_taken_from_its_header() {
        let app = app();
        let parts = head(Method::POST, &[("x-priority", "high")]);
        let (r, rec) = run(&app, &parts, Full::new(Bytes::from_static(b"{}")), 1000);
        assert_eq!(r.unwrap(), Bytes::from_static(b"{}"));
        assert_eq!(rec.priority, Priority::High);
    }

    #[test]
    fn a_body_past_the_limit_is_refused_whether_declared_or_streamed() {
        let app = app();
        let declared = head(Method::POST, &[("content-length", "2048")]);
        let (r, _) = run(&app, &declared, Full::new(Bytes::new()), 1000);
        assert!(
            matches!(r, Err(ProxyError::BodyTooLarge { limit: 1024 })),
            "{r:?}"
        );
        let chunks =
            (0..3).map(|_| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![b'x'; 512]))));
        let streamed = StreamBody::new(ready_stream(chunks));
        let (r, _) = run(&app, &head(Method::POST, &[]), streamed, 1000);
        assert!(
            matches!(r, Err(ProxyError::BodyTooLarge { limit: 1024 })),
            "{r:?}"
        );
    }

    #[test]
    fn a_body_that_does_not_arrive_before_the_deadline_times_out() {
        let app = app();
        let never = StreamBody::new(tokio_stream::pending::<
            Result<http_body::Frame<Bytes>, BoxError>,
        >());
        let (r, _) = run(&app, &head(Method::POST, &[]), never, 0);
        assert!(matches!(r, Err(ProxyError::BodyTimeout)), "{r:?}");
    }

    #[test]
    fn a_bad_head_is_refused_before_the_body_is_read() {
        let app = app();
        let (r, _) = run(
            &app,
            &head(Method::TRACE, &[]),
            Full::new(Bytes::new()),
            1000,
        );
        assert!(
            matches!(r, Err(ProxyError::MethodNotForwarded { .. })),
            "{r:?}"
        );
        let (r, _) = run(
            &app,
            &head(Method::POST, &[("x-priority", "urgent")]),
            Full::new(Bytes::new()),
            1000,
        );
        assert!(matches!(r, Err(ProxyError::InvalidPriority(_))), "{r:?}");
        let mut no_host = head(Method::POST, &[]);
        no_host.headers.remove(header::HOST);
        let (r, _) = run(&app, &no_host, Full::new(Bytes::new()), 1000);
        assert!(matches!(r, Err(ProxyError::Framing(_))), "{r:?}");
    }

    #[test]
    fn a_head_wrong_in_every_way_is_refused_for_the_first_check_in_order() {
        // Framing, then the method, then the limits, then the priority: each fix in turn
        // uncovers the next refusal.
        let app = app();
        let check_head = |parts: &Parts| check(&app, parts, &mut record());
        let mut worst = head(Method::TRACE, &[("x-priority", "urgent")]);
        for i in 0..app.config.limits.max_headers {
            worst.headers.append(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        worst
            .headers
            .append(header::HOST, HeaderValue::from_static("b"));
        let r = check_head(&worst);
        assert!(
            matches!(
                r,
                Err(ProxyError::Framing(framing::FramingError::DuplicateHost {
                    count: 2
                }))
            ),
            "{r:?}"
        );
        worst
            .headers
            .insert(header::HOST, HeaderValue::from_static("a"));
        let r = check_head(&worst);
        assert!(
            matches!(r, Err(ProxyError::MethodNotForwarded { .. })),
            "{r:?}"
        );
        worst.method = Method::POST;
        let r = check_head(&worst);
        assert!(
            matches!(r, Err(ProxyError::HeadersTooLarge { .. })),
            "{r:?}"
        );
        for i in 0..app.config.limits.max_headers {
            worst.headers.remove(format!("x-{i}"));
        }
        let r = check_head(&worst);
        assert!(matches!(r, Err(ProxyError::InvalidPriority(_))), "{r:?}");
        worst
            .headers
            .insert(headers::X_PRIORITY, HeaderValue::from_static("high"));
        assert!(check_head(&worst).is_ok());
    }

    /// A stream of `items`, ready one after another.
    fn ready_stream<T>(
        items: impl Iterator<Item = T>,
    ) -> impl tokio_stream::Stream<Item = T> + Unpin {
        tokio_stream::iter(items.collect::<Vec<_>>())
    }

    #[test]
    fn a_mapped_client_key_sets_the_default_priority() {
        let map: HashMap<String, Priority> = [("sk-batch".to_owned(), Priority::Low)]
            .into_iter()
            .collect();
        let mut h = http::HeaderMap::new();
        assert_eq!(client_priority(&map, &h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-batch"),
        );
        assert_eq!(client_priority(&map, &h), Some(Priority::Low));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert_eq!(client_priority(&map, &h), None);
        assert_eq!(client_priority(&Default::default(), &h), None);
    }
}
