//! What the request path needs of the worker that runs it.

use std::rc::Rc;

use crate::app::App;
use crate::metrics::ShardHandle;
use crate::upstream::Pool;

/// The shared app, the worker's upstream pool and its metrics shard.
#[derive(Clone, Copy)]
pub struct Ctx<'w> {
    pub app: &'w App,
    pub pool: &'w Rc<Pool>,
    pub metrics: &'w ShardHandle,
}
