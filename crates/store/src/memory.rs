//! In-memory [`StateStore`]: for tests and the simulator.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::{Entry, Expect, Result, StateStore, TxnOp, check_unique_keys, conflict};

#[derive(Default)]
struct Inner {
    revision: u64,
    keys: BTreeMap<String, (u64, Vec<u8>)>,
}

/// A [`StateStore`] held in memory; lost when dropped.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied write (writes are applied
        // after every check), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(self.lock().keys.get(key).cloned())
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<Option<u64>> {
        let mut inner = self.lock();
        let current = inner.keys.get(key).map(|(r, _)| *r);
        if !expect.holds(current) {
            return Err(conflict(key, expect, current));
        }
        if current.is_none() {
            return Ok(None);
        }
        inner.revision += 1;
        inner.keys.remove(key);
        Ok(Some(inner.revision))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let inner = self.lock();
        Ok(inner
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (r, v))| Entry {
                key: k.clone(),
                revision: *r,
                value: v.clone(),
            })
            .collect())
    }

    fn revision(&self) -> Result<u64> {
        Ok(self.lock().revision)
    }

    fn txn(&self, ops: Vec<TxnOp>) -> Result<u64> {
        check_unique_keys(&ops)?;
        let mut inner = self.lock();
        for op in &ops {
            let current = inner.keys.get(op.key()).map(|(r, _)| *r);
            if !op.expect().holds(current) {
                return Err(conflict(op.key(), op.expect(), current));
            }
        }
        if ops.iter().all(|op| matches!(op, TxnOp::Check { .. })) {
            return Ok(inner.revision);
        }
        inner.revision += 1;
        let rev = inner.revision;
        for op in ops {
            match op {
                TxnOp::Put { key, value, .. } => {
                    inner.keys.insert(key, (rev, value));
                }
                TxnOp::Delete { key, .. } => {
                    inner.keys.remove(&key);
                }
                TxnOp::Check { .. } => {}
            }
        }
        Ok(rev)
    }
}
