//! The threads' plumbing: a background worker that keeps its first error,
//! the abort handle every writer honours, and the writers' first-error slot.

use super::*;

/// Stops a sync's in-place writes from any thread. Once [`abort`](Self::abort)
/// returns, no write of the sync is in flight and none will start: whoever
/// undoes the sync afterwards is not raced by it.
#[derive(Clone, Default)]
pub struct AbortHandle(Arc<RwLock<bool>>);

impl AbortHandle {
    /// Stops the writes, waiting for the ones in flight.
    pub fn abort(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = true;
    }

    pub fn is_aborted(&self) -> bool {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `write` unless aborted, holding [`abort`](Self::abort) off until
    /// it returns.
    pub(super) fn guard<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let aborted = self.0.read().unwrap_or_else(|e| e.into_inner());
        (!*aborted).then(write)
    }
}

/// A thread that works through a queue in the background and keeps its first
/// error for whoever waits for it. Reporting an error also aborts the sync's
/// writes.
pub(super) struct Worker {
    pub(super) name: &'static str,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(super) failed: Arc<Mutex<Option<Error>>>,
}

impl Worker {
    /// Runs `body` on a thread named after `name`; `body` reports errors
    /// through the function it is given.
    pub(super) fn spawn(
        name: &'static str,
        stop: AbortHandle,
        body: impl FnOnce(&dyn Fn(Error)) + Send + 'static,
    ) -> Result<Self> {
        let failed: Arc<Mutex<Option<Error>>> = Arc::default();
        let slot = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("apollo-sync-{name}"))
            .spawn(move || {
                body(&|e| {
                    stop.abort();
                    slot.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                })
            })
            .map_err(|e| Error::Plan(format!("cannot start the {name} thread: {e}")))?;
        Ok(Worker {
            name,
            thread: Some(thread),
            failed,
        })
    }

    /// The first error so far, if any.
    pub(super) fn check(&self) -> Result<()> {
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for the thread (whose queue the caller has closed), then
    /// returns its first error.
    pub(super) fn join(&mut self) -> Result<()> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| Error::Plan(format!("the {} thread panicked", self.name)))?;
        }
        self.check()
    }

    pub(super) fn joined(&self) -> bool {
        self.thread.is_none()
    }
}

/// Records a writer's failure (the first one wins) and stops the other writers.
pub(super) fn fail(failed: &Mutex<Option<Error>>, abort: &AtomicBool, e: Error) {
    abort.store(true, Ordering::Relaxed);
    failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(e);
}
