//! Atomics through one door, so the CAS protocols can be model-checked by loom
//! (`RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom`).

#[cfg(sidecar_loom)]
pub use loom::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(sidecar_loom))]
pub use std::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// One turn of a spin-wait: under loom a yield, so the model checker lets the thread
/// being waited on run instead of exploring an endless spin.
#[inline]
pub fn spin() {
    #[cfg(sidecar_loom)]
    loom::thread::yield_now();
    #[cfg(not(sidecar_loom))]
    std::hint::spin_loop();
}

/// The controller's mutex: parking_lot's, or loom's under the model checker so a model
/// explores every order of the dispatcher, the request path and an admin change.
#[cfg(not(sidecar_loom))]
pub use parking_lot::Mutex;

#[cfg(sidecar_loom)]
#[derive(Debug)]
pub struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(sidecar_loom)]
impl<T> Mutex<T> {
    pub fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().expect("a model thread panicked")
    }
}
