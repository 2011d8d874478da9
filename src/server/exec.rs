//! The executor hyper's HTTP/2 connections (server and client) spawn their streams on.

use std::future::Future;

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
