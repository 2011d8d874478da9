//! Start-up order: the metrics listener (which also runs the snapshot publisher) first,
//! then the proxy's workers, each with its own upstream pool and metrics shard.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::server::RequestBody;
use http::Request;
use tokio_util::sync::CancellationToken;

use super::dispatch;
use super::worker::Worker;
use crate::app::App;
use crate::dashboard::Publisher;
use crate::health::Readiness;
use crate::server::{self, ServerSpec, Shutdown};

/// A started sidecar: the proxy's workers and the metrics listener.
#[derive(Debug)]
pub struct Running {
    /// The proxy's address.
    pub local_addr: SocketAddr,
    /// The metrics listener's address.
    pub metrics_addr: SocketAddr,
    pub shutdown: Shutdown,
    proxy: server::Running,
    metrics: server::Running,
}

impl Running {
    /// Begins a graceful shutdown (stop accepting, drain, cut at the grace period).
    pub fn begin_shutdown(&self) {
        self.shutdown.draining.cancel();
    }

    /// Waits for every worker to finish.
    pub fn join(self) {
        self.proxy.join();
        self.metrics.join();
    }

    /// Shuts down and waits.
    pub fn stop(self) {
        self.begin_shutdown();
        self.join();
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
pub fn start(app: Arc<App>) -> Result<Running, ListenError> {
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
    let proxy = match start_workers(app) {
        Ok(p) => p,
        Err(e) => {
            metrics.stop();
            return Err(failed(Listener::Proxy, listen)(e));
        }
    };
    Ok(Running {
        local_addr: proxy.local_addr,
        metrics_addr: metrics.local_addr,
        shutdown: proxy.shutdown.clone(),
        proxy,
        metrics,
    })
}

/// The metrics listener: one thread serving `GET /metrics`, and the publisher task.
fn start_metrics(app: Arc<App>) -> std::io::Result<server::Running> {
    let spec = ServerSpec {
        name: "metrics",
        listen: app.config.metrics_listen,
        workers: 1,
        limits: app.config.limits.clone(),
        fairness: app.config.fairness,
        grace: Duration::from_secs(1),
    };
    let shutdown = Shutdown {
        draining: app.shutdown.draining.clone(),
        hard_stop: CancellationToken::new(),
    };
    server::spawn(spec, shutdown, move |_| {
        tokio::task::spawn_local(Publisher::new(Arc::clone(&app)).run());
        let app = Arc::clone(&app);
        move |req: Request<RequestBody>, _remote: SocketAddr| {
            let app = Arc::clone(&app);
            async move { crate::exposition::serve(&app, &req) }
        }
    })
}

fn start_workers(app: Arc<App>) -> std::io::Result<server::Running> {
    let spec = ServerSpec {
        name: "sidecar",
        listen: app.config.listen,
        workers: app.config.workers.get(),
        limits: app.config.limits.clone(),
        fairness: app.config.fairness,
        grace: app.config.timeouts.shutdown_grace,
    };
    let shutdown = app.shutdown.clone();
    let readiness = Arc::new(Readiness::default());
    server::spawn(spec, shutdown, move |id| {
        let worker = Rc::new(Worker::new(id, Arc::clone(&app), Arc::clone(&readiness)));
        let w = Rc::clone(&worker);
        server::WithWorker {
            maps: Rc::clone(&worker.maps),
            handler: move |req: Request<RequestBody>, remote: SocketAddr| {
                dispatch::serve(Rc::clone(&worker), req, remote)
            },
            ids: move || w.next_request_id(),
        }
    })
}
