//! Opens upstream connections: DNS, TCP with `TCP_NODELAY`, rustls with webpki roots,
//! and the HTTP/1.1 or HTTP/2 handshake chosen by ALPN.
//!
//! An HTTP/2 connection is driven by a task on the calling worker's `LocalSet`; an
//! HTTP/1.1 one by the tasks of the requests it carries. Either way a connection, its
//! pool slot and the requests on it never leave one thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::io::Io;
use crate::config::{Scheme, UpstreamUrl};
use crate::server::LocalExec;

/// A freshly opened connection: an HTTP/1.1 transport for the request's own task to
/// drive, or hyper's handle of an HTTP/2 connection (chosen by ALPN).
pub enum Handshaken {
    H1(Io),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("DNS lookup of {host} failed: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr} failed: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS server name {0}")]
    ServerName(String),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// Connection factory shared by all workers (it holds only immutable TLS settings).
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_extra_roots(connect_timeout, &[])
    }

    /// Trusts `extra` CA certificates besides the webpki roots (a private CA, a
    /// corporate TLS proxy, a test server).
    pub fn with_extra_roots(
        connect_timeout: Duration,
        extra: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Self {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let (added, ignored) = roots.add_parsable_certificates(extra.iter().cloned());
        if ignored > 0 {
            tracing::warn!(
                added,
                ignored,
                "some upstream CA certificates could not be used"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            connect_timeout,
        }
    }

    /// Opens a connection to `url` within the connect timeout and starts its driver task.
    pub async fn connect(&self, url: &UpstreamUrl) -> Result<Handshaken, ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.connect_inner(url))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))?
    }

    async fn connect_inner(&self, url: &UpstreamUrl) -> Result<Handshaken, ConnectError> {
        let tcp = tcp_connect(&url.host, url.port).await?;
        match url.scheme {
            Scheme::Http => Ok(Handshaken::H1(Io::Tcp(tcp))),
            Scheme::Https => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|_| ConnectError::ServerName(url.host.clone()))?;
                let tls =
                    self.tls
                        .connect(name, tcp)
                        .await
                        .map_err(|source| ConnectError::Tls {
                            host: url.host.clone(),
                            source,
                        })?;
                let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                if is_h2 {
                    h2(tls).await
                } else {
                    Ok(Handshaken::H1(Io::Tls(Box::new(tls))))
                }
            }
        }
    }
}

async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Without TCP_NODELAY a reused connection stalls ~40 ms on delayed ACKs.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.unwrap_or_else(|| {
        (
            SocketAddr::from(([0, 0, 0, 0], port)),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        )
    });
    Err(ConnectError::Tcp {
        addr: addr.to_string(),
        source,
    })
}

async fn h2<T>(io: T) -> Result<Handshaken, ConnectError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (send, conn) = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream h2 connection ended with an error");
        }
    });
    Ok(Handshaken::H2(send))
}
