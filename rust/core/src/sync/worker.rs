//! The threads' plumbing: a background worker, the abort handle every writer
//! honours, and the sync's one first-error slot.

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
    pub(crate) fn guard<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let aborted = self.0.read().unwrap_or_else(|e| e.into_inner());
        (!*aborted).then(write)
    }
}

/// The first error of a sync, whichever of its threads met it: the diff, the
/// commit thread, a writer or the flusher. The first one set wins and later
/// ones are dropped; setting it also aborts the sync's writes, so the other
/// threads stop. One per sync, shared by all of them.
#[derive(Clone)]
pub(crate) struct FirstError {
    slot: Arc<Mutex<Option<Error>>>,
    pub(crate) stop: AbortHandle,
}

impl FirstError {
    pub(super) fn new(stop: AbortHandle) -> Self {
        FirstError {
            slot: Arc::default(),
            stop,
        }
    }

    /// Keeps `e` unless an earlier error is kept, and stops the writes.
    pub(crate) fn set(&self, e: Error) {
        self.stop.abort();
        self.slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    /// The kept error, handed out once (the sync fails with it, then aborts).
    pub(crate) fn take(&self) -> Result<()> {
        match self.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A thread that works through a queue in the background, reporting its
/// errors to the sync's [`FirstError`].
pub(crate) struct Worker {
    pub(super) name: &'static str,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
    pub(crate) errors: FirstError,
}

impl Worker {
    /// Runs `body` on a thread named after `name`; `body` reports errors
    /// through the function it is given.
    pub(crate) fn spawn(
        name: &'static str,
        errors: FirstError,
        body: impl FnOnce(&dyn Fn(Error)) + Send + 'static,
    ) -> Result<Self> {
        let slot = errors.clone();
        let thread = std::thread::Builder::new()
            .name(format!("apollo-sync-{name}"))
            .spawn(move || body(&|e| slot.set(e)))
            .map_err(|e| Error::Plan(format!("cannot start the {name} thread: {e}")))?;
        Ok(Worker {
            name,
            thread: Some(thread),
            errors,
        })
    }

    /// The sync's first error so far, if any.
    pub(crate) fn check(&self) -> Result<()> {
        self.errors.take()
    }

    /// Waits for the thread (whose queue the caller has closed), then
    /// returns the sync's first error.
    pub(crate) fn join(&mut self) -> Result<()> {
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| Error::Plan(format!("the {} thread panicked", self.name)))?;
        }
        self.check()
    }

    pub(crate) fn joined(&self) -> bool {
        self.thread.is_none()
    }
}
