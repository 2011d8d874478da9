//! Thread-per-core HTTP server: one current-thread runtime, one `SO_REUSEPORT` listener
//! and one `LocalSet` per worker.
//!
//! A request never leaves the worker that accepted it, so per-worker state (the
//! upstream pool) needs no lock; state shared by all workers lives in `Arc`s with
//! atomics. Limits are explicit: a connection cap shared by all workers (near it the
//! oldest connections that have sent nothing are shed, at it accepting pauses: see
//! `fairness`), an optional cap per client address, a first-byte timeout for new
//! connections and a header read timeout (hyper needs a timer for it), header
//! count and size, HTTP/2 stream and header-list limits, keep-alive. Shutdown: stop
//! accepting, let connections drain, and at the end of the grace period cut what is
//! left (SSE bodies end themselves with an error event first, see `body`).

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

mod connection;
mod fairness;

use connection::{Conns, Setup};
pub use connection::{Tracked, CROWDED, PARK_AFTER};
use fairness::{Cap, PerIp};

use crate::app::{App, Shutdown};
use crate::body::BoxError;
use crate::config::{Fairness, Limits};
use crate::dashboard::FrameCache;
use crate::metrics::ShardHandle;
use crate::snapshot::publisher::Publisher;
use crate::upstream::Pool;
use tokio_util::sync::CancellationToken;

/// Runs `!Send` futures (connections, h2 streams) on the worker's `LocalSet`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Settings of one server (the proxy or the simulated upstream).
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub name: &'static str,
    pub listen: SocketAddr,
    pub workers: usize,
    pub limits: Limits,
    pub grace: Duration,
}

/// A started server: its bound address and worker threads.
#[derive(Debug)]
pub struct Running {
    pub local_addr: SocketAddr,
    /// The metrics listener's address, when this is the proxy.
    pub metrics_addr: Option<SocketAddr>,
    pub shutdown: Shutdown,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// Begins a graceful shutdown (stop accepting, drain, cut at the grace period).
    pub fn begin_shutdown(&self) {
        self.shutdown.draining.cancel();
    }

    /// Waits for every worker to finish.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Shuts down and waits.
    pub fn stop(self) {
        self.begin_shutdown();
        self.join();
    }
}

/// `SO_REUSEPORT` would let a second sidecar bind the same port and silently share its
/// traffic; binding once without it first turns a double start into `AddrInUse`.
fn ensure_port_free(addr: SocketAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{addr} is already in use: {e}")))?;
    socket.listen(1)?;
    Ok(())
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds `spec.workers` listeners to one address and starts a worker on each, with
/// [`Fairness::lenient`] (see [`spawn_with`]).
pub fn spawn<M, H, Fut, B>(
    spec: ServerSpec,
    shutdown: Shutdown,
    make_handler: M,
) -> std::io::Result<Running>
where
    M: Fn(usize) -> H + Send + Sync + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let fairness = Fairness::lenient(&spec.limits);
    spawn_with(spec, fairness, shutdown, make_handler)
}

/// Binds `spec.workers` listeners to one address and starts a worker on each.
///
/// `make_handler` runs once on each worker thread and returns that worker's request
/// handler, which may own `!Send` state such as an `Rc<Pool>`.
pub fn spawn_with<M, H, Fut, B>(
    spec: ServerSpec,
    fairness: Fairness,
    shutdown: Shutdown,
    make_handler: M,
) -> std::io::Result<Running>
where
    M: Fn(usize) -> H + Send + Sync + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if spec.listen.port() != 0 {
        ensure_port_free(spec.listen)?;
    }
    let first = bind_reuseport(spec.listen)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..spec.workers.max(1) {
        listeners.push(bind_reuseport(local_addr)?);
    }
    let cap = Cap::new(spec.limits.max_connections);
    let per_ip = fairness.max_connections_per_ip.map(PerIp::new);
    let make_handler = Arc::new(make_handler);
    let mut threads = Vec::with_capacity(listeners.len());
    for (id, listener) in listeners.into_iter().enumerate() {
        let spec = spec.clone();
        let shutdown = shutdown.clone();
        let (cap, per_ip) = (Arc::clone(&cap), per_ip.clone());
        let make_handler = Arc::clone(&make_handler);
        let thread = std::thread::Builder::new()
            .name(format!("{}-{id}", spec.name))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start worker runtime");
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot register listener");
                            return;
                        }
                    };
                    let setup = Rc::new(Setup {
                        handler: make_handler(id),
                        h1: h1_builder(&spec.limits),
                        h2: h2_builder(&spec.limits),
                        first_byte: fairness.first_byte_timeout,
                        idle_limit: spec.limits.header_read_timeout,
                        draining: shutdown.draining.clone(),
                        conns: Rc::new(Conns::new(CROWDED)),
                    });
                    worker_loop(&spec, listener, setup, cap, per_ip, shutdown).await;
                });
            })?;
        threads.push(thread);
    }
    Ok(Running {
        local_addr,
        metrics_addr: None,
        shutdown,
        threads,
    })
}

fn h1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's own limits sit above ours so that a request just over our limits gets
        // our JSON 431; hyper answers a bare 431 only far past them.
        .max_headers(limits.max_headers.saturating_mul(2))
        .max_buf_size((limits.max_header_bytes.saturating_mul(2)).max(64 * 1024))
        .keep_alive(limits.keep_alive);
    b
}

fn h2_builder(limits: &Limits) -> http2::Builder<LocalExec> {
    let mut b = http2::Builder::new(LocalExec);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .max_pending_accept_reset_streams(Some(64))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

async fn worker_loop<H, Fut, B>(
    spec: &ServerSpec,
    listener: TcpListener,
    setup: Rc<Setup<H>>,
    cap: Arc<Cap>,
    per_ip: Option<Arc<PerIp>>,
    shutdown: Shutdown,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let conns = Rc::clone(&setup.conns);
    let draining = shutdown.draining.clone();
    tokio::task::spawn_local({
        let (cap, silent, stop) = (Arc::clone(&cap), Rc::clone(&conns.silent), draining.clone());
        async move { cap.answer_calls(silent, stop).await }
    });
    loop {
        // The permit is taken before accept: at the cap, accepting pauses.
        let permit = tokio::select! {
            p = cap.acquire() => match p {
                Some(p) => p,
                None => break,
            },
            _ = draining.cancelled() => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off and retry, never leave the loop.
                    tracing::warn!(error = %e, server = spec.name, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = draining.cancelled() => break,
        };
        let by_ip = match &per_ip {
            None => None,
            Some(per_ip) => match per_ip.admit(remote.ip()) {
                Some(hold) => Some(hold),
                None => {
                    // Dropped: closed at once, and the permit is back.
                    tracing::debug!(
                        server = spec.name,
                        client = %remote.ip(),
                        "connection refused: max_connections_per_ip reached"
                    );
                    continue;
                }
            },
        };
        cap.make_room(&conns.silent);
        let _ = stream.set_nodelay(true);
        let silent = conns.silent.enter();
        let key = silent.key();
        let task = tokio::task::spawn_local(connection::serve(
            Rc::clone(&setup),
            stream,
            remote,
            silent,
            (permit, by_ip),
        ));
        conns.silent.watch(key, task.abort_handle());
    }
    drop(listener);
    tracing::debug!(
        server = spec.name,
        open = conns.open(),
        parked = conns.parked(),
        silent = conns.silent.len(),
        shed = conns.silent.shed(),
        "draining connections"
    );
    let all_done = conns.none_left();
    tokio::pin!(all_done);
    tokio::select! {
        _ = &mut all_done => {}
        _ = tokio::time::sleep(spec.grace) => {
            shutdown.hard_stop.cancel();
            // Streams end themselves on hard stop; give their last frames a moment.
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut all_done).await;
        }
    }
}

/// One proxy worker: the shared app plus this thread's upstream pool, metrics shard
/// and encoded dashboard frame.
pub struct Worker {
    pub id: usize,
    pub app: Arc<App>,
    pub pool: Rc<Pool>,
    pub metrics: ShardHandle,
    pub dashboard: FrameCache,
    requests: std::cell::Cell<u64>,
}

impl Worker {
    pub fn new(id: usize, app: Arc<App>) -> Self {
        let pool = Pool::new(app.connector.clone());
        Self {
            id,
            metrics: app.metrics.shard(id),
            dashboard: FrameCache::default(),
            app,
            pool,
            requests: std::cell::Cell::new(0),
        }
    }

    /// A 32-hex-digit request id unique to this process run, built straight into the
    /// header value it is sent and logged as.
    pub fn next_request_id(&self) -> http::HeaderValue {
        let n = self.requests.get().wrapping_add(1);
        self.requests.set(n);
        let low = ((self.id as u64 & 0xffff) << 48) | (n & 0xffff_ffff_ffff);
        let mut out = [0u8; 32];
        for (i, word) in [self.app.boot_id, low].into_iter().enumerate() {
            for j in 0..16 {
                let nibble = (word >> ((15 - j) * 4)) & 0xf;
                out[i * 16 + j] = b"0123456789abcdef"[nibble as usize];
            }
        }
        http::HeaderValue::from_bytes(&out).unwrap_or(http::HeaderValue::from_static("-"))
    }
}

/// Which listener could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Proxy,
    Metrics,
}

impl Listener {
    /// The settings that make its address.
    pub fn settings(self) -> [&'static str; 2] {
        match self {
            Self::Proxy => ["listen_host", "listen_port"],
            Self::Metrics => ["listen_host", "metrics_port"],
        }
    }
}

/// A listener that could not start: which one, its address and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the {}: {source}", match .listener { Listener::Proxy => "proxy", Listener::Metrics => "metrics" })]
pub struct ListenError {
    pub listener: Listener,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Starts the proxy on `app.config.listen`, and the metrics listener (which also runs
/// the snapshot publisher) on `app.config.metrics_listen`.
pub fn start_proxy(app: Arc<App>) -> Result<Running, ListenError> {
    let failed = |listener, addr| {
        move |source| ListenError {
            listener,
            addr,
            source,
        }
    };
    let (listen, metrics_listen) = (app.config.listen, app.config.metrics_listen);
    let metrics =
        start_metrics(Arc::clone(&app)).map_err(failed(Listener::Metrics, metrics_listen))?;
    let mut proxy = start_workers(app).map_err(failed(Listener::Proxy, listen))?;
    proxy.metrics_addr = Some(metrics.local_addr);
    proxy.threads.extend(metrics.threads);
    Ok(proxy)
}

/// The metrics listener: one thread serving `GET /metrics`, and the publisher task.
fn start_metrics(app: Arc<App>) -> std::io::Result<Running> {
    let spec = ServerSpec {
        name: "metrics",
        listen: app.config.metrics_listen,
        workers: 1,
        limits: app.config.limits.clone(),
        grace: Duration::from_secs(1),
    };
    let shutdown = Shutdown {
        draining: app.shutdown.draining.clone(),
        hard_stop: CancellationToken::new(),
    };
    spawn_with(spec, app.config.fairness, shutdown, move |_| {
        tokio::task::spawn_local(Publisher::new(Arc::clone(&app)).run());
        let app = Arc::clone(&app);
        move |req: Request<Incoming>, _remote: SocketAddr| {
            let app = Arc::clone(&app);
            async move { crate::metrics::endpoint::serve(&app, &req) }
        }
    })
}

fn start_workers(app: Arc<App>) -> std::io::Result<Running> {
    let spec = ServerSpec {
        name: "sidecar",
        listen: app.config.listen,
        workers: app.config.workers.get(),
        limits: app.config.limits.clone(),
        grace: app.config.timeouts.shutdown_grace,
    };
    let shutdown = app.shutdown.clone();
    spawn_with(spec, app.config.fairness, shutdown, move |id| {
        let worker = Rc::new(Worker::new(id, Arc::clone(&app)));
        move |req: Request<Incoming>, remote: SocketAddr| {
            crate::proxy::serve(Rc::clone(&worker), req, remote)
        }
    })
}
