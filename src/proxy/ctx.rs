//! What the request path needs of the worker that runs it.

use std::rc::Rc;
use std::sync::Arc;

use crate::app::App;
use crate::metrics::ShardHandle;
use crate::upstream::Pool;

/// The shared app, the worker's upstream pool and its metrics shard.
#[derive(Clone, Copy)]
pub struct Ctx<'w> {
    /// Shared (an answer's body that settles tokens keeps a reference past the request).
    pub app: &'w Arc<App>,
    pub pool: &'w Rc<Pool>,
    pub metrics: &'w ShardHandle,
}
