//! The assembly: what wires the sidecar's parts into one program.
//!
//! Nothing below this module knows of it. The generic server runs the handler
//! [`dispatch`] makes for each worker; the handlers (proxy, admin, dashboard, health,
//! metrics) take the [`crate::app::App`] and what else they need as arguments.
//!
//! - `start`: start-up order and listeners ([`start`], [`Running`], [`ListenError`]);
//! - `worker`: one worker thread's state ([`Worker`]);
//! - `dispatch`: every request's id and its route by path;
//! - `run`: the process's life: start, log what runs, wait for signals, reload on
//!   SIGHUP, drain ([`run`]);
//! - `budgets`: the shared budget's task, given what it needs of the app.

mod budgets;
mod dispatch;
mod run;
mod start;
mod worker;

pub use budgets::spawn_budgets;
pub use run::{run, signal};
pub use start::{start, ListenError, Listener, Running};
pub use worker::Worker;
