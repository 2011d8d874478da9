//! The `budget` thread: one current-thread runtime with a task per shared budget, away
//! from the workers so a slow Redis never delays a request.

use tokio_util::sync::CancellationToken;

use super::conn;
use super::inputs::Inputs;
use super::task::Task;

/// The thread that runs every budget's task; stops when [`Runner::stop`] is called or
/// the settings' owner is dropped ([`Inputs::settings`]).
#[derive(Debug)]
pub struct Runner {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Runner {
    /// Starts the tasks of `inputs.feeds` (none: no thread).
    pub fn spawn(inputs: Inputs) -> std::io::Result<Option<Self>> {
        if inputs.feeds.is_empty() {
            return Ok(None);
        }
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let thread = std::thread::Builder::new()
            .name("budget".into())
            .spawn(move || run(inputs, shutdown))?;
        Ok(Some(Self {
            thread: Some(thread),
            stop,
        }))
    }

    /// Gives back the tokens in hand and leaves the cluster (each call bounded by
    /// `redis_timeout`), then ends the thread.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut inputs: Inputs, shutdown: CancellationToken) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the shared budget's runtime: replicas stay on their fallback share");
            return;
        }
    };
    rt.block_on(async move {
        let redis = &inputs.redis;
        let conn = match conn::Conn::new(redis, &inputs.upstream_ca) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(url = redis.url.masked(), error = %conn::masked(&e, redis), "cannot use the Redis URL: replicas stay on their fallback share");
                return;
            }
        };
        let mut set = tokio::task::JoinSet::new();
        for feed in std::mem::take(&mut inputs.feeds) {
            let t = Task::new(feed, conn.clone(), &inputs);
            set.spawn(t.run(shutdown.clone()));
        }
        while set.join_next().await.is_some() {}
    });
}
