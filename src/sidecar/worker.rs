//! One proxy worker thread's state: the shared app plus what only this thread touches.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
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
    /// A request id's first 16 hex digits (the boot id), written once.
    id_prefix: [u8; 16],
}

/// `word` as 16 lowercase hex digits.
fn hex16(word: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (j, digit) in out.iter_mut().enumerate() {
        let nibble = (word >> ((15 - j) * 4)) & 0xf;
        *digit = b"0123456789abcdef"[nibble as usize];
    }
    out
}

impl Worker {
    pub fn new(id: usize, app: Arc<App>, readiness: Arc<Readiness>) -> Self {
        let pool = Pool::new(app.connector.clone());
        let app_boot_id = app.boot_id;
        Self {
            id,
            metrics: app.metrics.shard(id),
            dashboard: Rc::default(),
            readiness,
            app,
            pool,
            requests: Cell::new(0),
            id_prefix: hex16(app_boot_id),
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
        out[..16].copy_from_slice(&self.id_prefix);
        out[16..].copy_from_slice(&hex16(low));
        // One allocation for the digits and their reference count: the id is cloned into
        // the record, the upstream request and the answer, and a value copied from a
        // slice is a `Vec` that allocates again (its shared count) at its first clone.
        HeaderValue::from_maybe_shared(Bytes::from_owner(out))
            .unwrap_or(HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::config;

    #[test]
    fn request_ids_are_the_boot_id_then_the_worker_and_a_count_in_hex() {
        let app = App::new(config("", &[]));
        let boot = app.boot_id;
        let w = Worker::new(3, app, Arc::new(Readiness::default()));
        let first = w.next_request_id();
        let second = w.next_request_id();
        assert_eq!(
            first.to_str().unwrap(),
            format!("{boot:016x}0003000000000001")
        );
        assert_eq!(
            second.to_str().unwrap(),
            format!("{boot:016x}0003000000000002")
        );
        assert_eq!(first.clone(), first, "a clone is the same id");
    }
}
