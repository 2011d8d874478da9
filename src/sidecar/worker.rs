//! One proxy worker thread's state: the shared app plus what only this thread touches.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

use crate::app::App;
use crate::dashboard::FrameCache;
use crate::health::Readiness;
use crate::http1::Maps;
use crate::metrics::ShardHandle;
use crate::proxy;
use crate::upstream::Pool;

/// One proxy worker: the shared app plus this thread's upstream pool, metrics shard
/// and encoded dashboard frame.
pub struct Worker {
    pub id: usize,
    pub app: Arc<App>,
    pub pool: Rc<Pool>,
    /// Header maps recycled between requests, shared with the server and the pool.
    pub maps: Rc<Maps>,
    pub metrics: ShardHandle,
    pub dashboard: Rc<FrameCache>,
    /// The readiness verdicts, shared by all workers.
    pub readiness: Arc<Readiness>,
    /// The count in the last request id written.
    written: Cell<u64>,
    /// A request id's first 16 hex digits (the boot id), written once.
    id_prefix: [u8; 16],
    /// Request ids written ahead, side by side in one buffer, each cut off its front in
    /// turn: an id shares the buffer (a reference count), so one allocation serves
    /// [`IDS_AHEAD`] ids. (A buffer stays allocated while one of its ids lives: a request
    /// that lasts keeps its 1 KiB, so the batch is small.)
    ahead: RefCell<Bytes>,
}

/// How many request ids are written at once.
const IDS_AHEAD: usize = 32;

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
        let maps = Rc::new(Maps::default());
        let pool = Pool::new(app.connector.clone(), Rc::clone(&maps));
        let app_boot_id = app.boot_id;
        Self {
            id,
            maps,
            metrics: app.metrics.shard(id),
            dashboard: Rc::default(),
            readiness,
            app,
            pool,
            written: Cell::new(0),
            id_prefix: hex16(app_boot_id),
            ahead: RefCell::default(),
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

    /// A 32-hex-digit request id unique to this process run, as the header value it is
    /// sent and logged as (cloned into the record, the upstream request and the answer:
    /// each clone counts a reference, none copies).
    pub fn next_request_id(&self) -> HeaderValue {
        let mut ahead = self.ahead.borrow_mut();
        if ahead.is_empty() {
            *ahead = self.write_ids();
        }
        HeaderValue::from_maybe_shared(ahead.split_to(32)).unwrap_or(HeaderValue::from_static("-"))
    }

    /// The next [`IDS_AHEAD`] request ids: the boot id, the worker and the count.
    fn write_ids(&self) -> Bytes {
        let first = self.written.get();
        self.written.set(first.wrapping_add(IDS_AHEAD as u64));
        // Each id written in place: zeroing the buffer first measured as ~30 instructions
        // more per request.
        let ids = IdsAhead(std::array::from_fn(|i| {
            let n = first.wrapping_add(i as u64 + 1);
            let low = ((self.id as u64 & 0xffff) << 48) | (n & 0xffff_ffff_ffff);
            let mut id = [0u8; 32];
            id[..16].copy_from_slice(&self.id_prefix);
            id[16..].copy_from_slice(&hex16(low));
            id
        }));
        // One allocation for the digits and their reference count (a `Vec` would take a
        // second, for its shared count, at its first clone).
        Bytes::from_owner(ids)
    }
}

/// [`IDS_AHEAD`] request ids, as the bytes they are cut from.
struct IdsAhead([[u8; 32]; IDS_AHEAD]);

impl AsRef<[u8]> for IdsAhead {
    fn as_ref(&self) -> &[u8] {
        self.0.as_flattened()
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

    #[test]
    fn request_ids_stay_whole_and_distinct_across_buffers() {
        let app = App::new(config("", &[]));
        let boot = app.boot_id;
        let w = Worker::new(7, app, Arc::new(Readiness::default()));
        // Three buffers' worth, every id kept alive while later ones are written.
        let ids: Vec<HeaderValue> = (0..3 * IDS_AHEAD + 5)
            .map(|_| w.next_request_id())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let n = i as u64 + 1;
            assert_eq!(id.to_str().unwrap(), format!("{boot:016x}0007{n:012x}"));
        }
    }
}
