//! Thread-per-core HTTP server: one current-thread runtime, one `SO_REUSEPORT` listener
//! and one `LocalSet` per worker.
//!
//! Generic: it runs whatever [`Handler`] each worker makes, and knows nothing of the
//! proxy, the admin API or the dashboard (`sidecar` wires those in; the simulated
//! upstream uses the same server).
//!
//! A request never leaves the worker that accepted it, so per-worker state (the
//! upstream pool) needs no lock; state shared by all workers lives in `Arc`s with
//! atomics. Limits are explicit: a connection cap shared by all workers (near it the
//! oldest connections that have sent nothing are shed, at it accepting pauses: see
//! `fairness`), an optional cap per client address, a first-byte timeout for new
//! connections and a header read timeout (hyper needs a timer for it), header
//! count and size, HTTP/2 stream and header-list limits, keep-alive. Shutdown: stop
//! accepting, let connections drain, and at the end of the grace period cut what is
//! left (the handler's bodies may end themselves first on [`Shutdown::hard_stop`]).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::TokioTimer;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

mod body;
mod connection;
mod conns;
mod exec;
mod fairness;
pub mod h1;
mod handler;

pub use body::{BodyError, RequestBody};
use connection::Setup;
use conns::Conns;
pub use exec::LocalExec;
use fairness::{Cap, PerIp};
pub use handler::{Handler, WithWorker};

use crate::config::{Fairness, Limits};
use tokio_util::sync::CancellationToken;

/// Shutdown in two steps: stop accepting, then (after the grace period) cut what is left.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled on SIGTERM/SIGINT: listeners close, connections drain.
    pub draining: CancellationToken,
    /// Cancelled when the grace period ends: SSE streams end with an error event,
    /// requests still waiting for the upstream get a 503.
    pub hard_stop: CancellationToken,
}

/// Settings of one server (the proxy, its metrics listener or the simulated upstream).
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub name: &'static str,
    pub listen: SocketAddr,
    pub workers: usize,
    pub limits: Limits,
    /// Per-client limits: a cap per address and the first-byte timeout
    /// ([`Fairness::lenient`] where clients are trusted, as for the simulated upstream).
    pub fairness: Fairness,
    pub grace: Duration,
}

/// A started server: its bound address and worker threads.
#[derive(Debug)]
pub struct Running {
    pub local_addr: SocketAddr,
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

/// Binds `spec.workers` listeners to one address and starts a worker on each.
///
/// `make_handler` runs once on each worker thread and returns that worker's request
/// handler, which may own `!Send` state such as an `Rc<Pool>`.
pub fn spawn<M, H>(
    spec: ServerSpec,
    shutdown: Shutdown,
    make_handler: M,
) -> std::io::Result<Running>
where
    M: Fn(usize) -> H + Send + Sync + 'static,
    H: Handler,
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
    let per_ip = spec.fairness.max_connections_per_ip.map(PerIp::new);
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
                    let handler = make_handler(id);
                    let h1 = h1_setup(&spec.limits, handler.header_maps());
                    let setup = Rc::new(Setup {
                        handler,
                        h1,
                        h2: h2_builder(&spec.limits),
                        first_byte: spec.fairness.first_byte_timeout,
                        draining: shutdown.draining.clone(),
                        conns: Rc::new(Conns::new()),
                    });
                    worker_loop(&spec, listener, setup, cap, per_ip, shutdown).await;
                });
            })?;
        threads.push(thread);
    }
    Ok(Running {
        local_addr,
        shutdown,
        threads,
    })
}

fn h1_setup(limits: &Limits, maps: Rc<crate::http1::Maps>) -> h1::H1 {
    // The server's bounds sit above the handler's, so that a request just over the
    // handler's limits gets its JSON 431 with a request id; the server answers its own
    // only far past them.
    let head = h1::HeadLimits {
        max_headers: limits.max_headers.saturating_mul(2),
        max_head_bytes: limits.max_header_bytes.saturating_mul(2).max(64 * 1024),
    };
    h1::H1::new(
        head,
        limits.header_read_timeout,
        limits.keep_alive,
        crate::framing::linger_bytes(limits.max_body_bytes),
        maps,
    )
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

async fn worker_loop<H: Handler>(
    spec: &ServerSpec,
    listener: TcpListener,
    setup: Rc<Setup<H>>,
    cap: Arc<Cap>,
    per_ip: Option<Arc<PerIp>>,
    shutdown: Shutdown,
) {
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
