//! Every task of a transport lives in one `JoinSet`, so shutdown can wait for all of them
//! (and abort stragglers) and nothing outlives the transport.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::task::{AbortHandle, JoinSet};

pub(crate) struct Tasks {
    set: Mutex<Option<JoinSet<()>>>,
    live: Arc<AtomicUsize>,
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the task when dropped.
pub(crate) struct AbortOnDrop(pub AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks {
            set: Mutex::new(Some(JoinSet::new())),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Spawns `f`; `None` (and `f` is dropped) once the transport is shutting down.
    pub(crate) fn spawn<F>(&self, f: F) -> Option<AbortHandle>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut guard = lock(&self.set);
        let set = guard.as_mut()?;
        // Reap finished tasks so the set does not grow.
        while set.try_join_next().is_some() {}
        self.live.fetch_add(1, Ordering::SeqCst);
        let live = LiveGuard(self.live.clone());
        Some(set.spawn(async move {
            let _live = live;
            f.await
        }))
    }

    /// Takes the set: no task can be spawned afterwards.
    pub(crate) fn take(&self) -> Option<JoinSet<()>> {
        lock(&self.set).take()
    }

    /// Tasks not yet finished (or not yet dropped after an abort).
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

/// Locks a mutex; a poisoned one (a panic elsewhere) is still used: the data is plain.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
