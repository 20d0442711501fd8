//! A small runtime of pgharness' own, on its own thread, that drives every connection a
//! `TestDb` opens. Connections so outlive the test's runtime, and `Drop` can wait for
//! teardown without deadlocking a current-thread test runtime.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::{Builder, Runtime};

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pgharness-driver")
            .enable_all()
            .build()
            .unwrap_or_else(|error| {
                panic!("pgharness: failed to start its driver runtime: {error}")
            })
    })
}

/// Runs `future` on the driver runtime and awaits it from any runtime.
pub(crate) async fn run<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime().spawn(future).await {
        Ok(output) => output,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// Runs `future` on the driver runtime and blocks this thread until it finishes or
/// `timeout` passes. Safe to call from inside another runtime (used by `Drop`).
pub(crate) fn block_on<F>(future: F, timeout: Duration) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv_timeout(timeout).ok()
}

/// Runs `future` on the driver runtime, not waited for.
pub(crate) fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    drop(runtime().spawn(future));
}
