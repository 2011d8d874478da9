//! Upstream over TLS: rustls with the configured CA, HTTP/2 chosen by ALPN (or
//! HTTP/1.1 when that is all the upstream offers), the key injected, the connection
//! reused.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// An HTTPS upstream offering `alpn`, answering with what it saw: protocol version and
/// key.
async fn tls_upstream(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> std::net::SocketAddr {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut connection = 0u32;
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            connection += 1;
            let conn_no = connection;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "authorization": req.headers().get("authorization").and_then(|v| v.to_str().ok()),
                        "path": req.uri().path(),
                        "connection": conn_no,
                    });
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        body.to_string(),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// Three chats through a sidecar to an HTTPS upstream offering `alpn`, one at a time:
/// what the upstream saw of each.
async fn three_chats_over_tls(alpn: &[&[u8]]) -> Vec<serde_json::Value> {
    let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(signed.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signed.signing_key.serialize_der()));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, signed.cert.pem()).unwrap();
    let up = tls_upstream(cert, key, alpn).await;

    let url = format!("https://localhost:{}/v1", up.port());
    let app = nvidia_sidecar::app::App::new(common::config_from(&[
        ("SIDECAR_UPSTREAM_URL", &url),
        ("SIDECAR_UPSTREAM_CA_FILE", ca.to_str().unwrap()),
    ]));
    let sidecar = nvidia_sidecar::sidecar::start(app).unwrap();
    let addr = sidecar.local_addr;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let a = common::call(
            addr,
            common::req(
                "POST",
                addr,
                "/v1/chat/completions",
                &[("authorization", "Bearer client")],
                common::CHAT,
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text());
        seen.push(a.json());
    }
    sidecar.stop();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_reached_over_h2_with_the_configured_ca_and_the_provider_key() {
    let seen = three_chats_over_tls(&[b"h2", b"http/1.1"]).await;
    for v in &seen {
        assert_eq!(v["version"], "HTTP/2.0", "ALPN should pick h2: {v}");
        assert_eq!(v["authorization"], "Bearer nvapi-provider-key-0001");
        assert_eq!(v["path"], "/v1/chat/completions");
        assert_eq!(
            v["connection"], 1,
            "one h2 connection serves every request: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_offering_only_http_1_1_is_reached_and_its_connection_reused() {
    // The sidecar's own HTTP/1.1 client over rustls: the same answers, one connection
    // reused from the idle list for each request in turn.
    let seen = three_chats_over_tls(&[b"http/1.1"]).await;
    for v in &seen {
        assert_eq!(v["version"], "HTTP/1.1", "{v}");
        assert_eq!(v["authorization"], "Bearer nvapi-provider-key-0001");
        assert_eq!(v["path"], "/v1/chat/completions");
        assert_eq!(v["connection"], 1, "the connection is reused: {v}");
    }
}

#[test]
fn without_the_ca_the_self_signed_upstream_is_refused_with_502() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = CertificateDer::from(signed.cert.der().to_vec());
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signed.signing_key.serialize_der()));
        let up = tls_upstream(cert, key, &[b"h2", b"http/1.1"]).await;
        let url = format!("https://localhost:{}/v1", up.port());
        let app =
            nvidia_sidecar::app::App::new(common::config_from(&[("SIDECAR_UPSTREAM_URL", &url)]));
        let sidecar = nvidia_sidecar::sidecar::start(app).unwrap();
        let addr = sidecar.local_addr;
        let a = common::call(
            addr,
            common::req("POST", addr, "/v1/chat/completions", &[], common::CHAT),
        )
        .await;
        a.assert_error(502, "upstream_unavailable");
        assert!(
            a.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("TLS"),
            "{}",
            a.text()
        );
        tokio::task::spawn_blocking(move || sidecar.stop())
            .await
            .unwrap();
    });
}
