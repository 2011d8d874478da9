//! One proxy worker thread's state: the shared app plus what only this thread touches.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use http::HeaderValue;

use crate::app::App;
use crate::dashboard::FrameCache;
use crate::health::Readiness;
use crate::metrics::ShardHandle;
use crate::proxy;
use crate::upstream::Pool;

/// One proxy worker: the shared app plus this thread's upstream pool, metrics shard
/// and encoded dashboard frame.
pub struct Worker {
    pub id: usize,
    pub app: Arc<App>,
    pub pool: Rc<Pool>,
    pub metrics: ShardHandle,
    pub dashboard: Rc<FrameCache>,
    /// The readiness verdicts, shared by all workers.
    pub readiness: Arc<Readiness>,
    requests: Cell<u64>,
}

impl Worker {
    pub fn new(id: usize, app: Arc<App>, readiness: Arc<Readiness>) -> Self {
        let pool = Pool::new(app.connector.clone());
        Self {
            id,
            metrics: app.metrics.shard(id),
            dashboard: Rc::default(),
            readiness,
            app,
            pool,
            requests: Cell::new(0),
        }
    }

    /// What the request path needs of this worker.
    pub fn proxy(&self) -> proxy::Ctx<'_> {
        proxy::Ctx {
            app: &self.app,
            pool: &self.pool,
            metrics: &self.metrics,
        }
    }

    /// A 32-hex-digit request id unique to this process run, built straight into the
    /// header value it is sent and logged as.
    pub fn next_request_id(&self) -> HeaderValue {
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
        HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("-"))
    }
}
