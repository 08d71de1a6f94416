//! The controller's state store: a revisioned key-value store.
//!
//! The model follows etcd's so that an etcd backend can be added without changing callers:
//!
//! * keys are UTF-8 strings, values are opaque bytes (the controller stores JSON);
//! * the store has one revision counter; every successful write (a put, a delete, or a whole
//!   transaction) increments it by one, and every key written remembers the store revision of
//!   its last modification (etcd's `mod_revision`), which is what [`Get`] and [`list`] return;
//! * writes take an [`Expect`] precondition (compare-and-swap): a write whose precondition does
//!   not hold fails with [`StoreError::Conflict`] and changes nothing;
//! * [`StateStore::txn`] applies several preconditioned writes atomically (all or nothing) at
//!   one new revision.
//!
//! Implementations: [`MemoryStore`] (tests, simulation) and [`RedbStore`] (embedded, crash-safe
//! by redb's copy-on-write commits; the controller's default, file `state.redb`).
//!
//! [`Get`]: StateStore::get
//! [`list`]: StateStore::list

mod memory;
mod redb_store;

pub use memory::MemoryStore;
pub use redb_store::RedbStore;

/// Precondition of a write, checked against the key's current modification revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No precondition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this modification revision.
    Revision(u64),
}

impl Expect {
    /// Whether the precondition holds for a key whose current revision is `current`.
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current == Some(r),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Any => f.write_str("any"),
            Expect::Absent => f.write_str("absent"),
            Expect::Revision(r) => write!(f, "revision {r}"),
        }
    }
}

/// One key as returned by [`StateStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// Store revision of the key's last modification.
    pub revision: u64,
    pub value: Vec<u8>,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        expect: Expect,
    },
    Delete {
        key: String,
        expect: Expect,
    },
    /// Only a precondition: writes nothing (etcd's compare without a write).
    Check {
        key: String,
        expect: Expect,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, expect: Expect) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            expect,
        }
    }
    pub fn delete(key: impl Into<String>, expect: Expect) -> Self {
        TxnOp::Delete {
            key: key.into(),
            expect,
        }
    }
    pub fn check(key: impl Into<String>, expect: Expect) -> Self {
        TxnOp::Check {
            key: key.into(),
            expect,
        }
    }
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } | TxnOp::Check { key, .. } => key,
        }
    }
    pub fn expect(&self) -> Expect {
        match self {
            TxnOp::Put { expect, .. }
            | TxnOp::Delete { expect, .. }
            | TxnOp::Check { expect, .. } => *expect,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap precondition did not hold; nothing was written.
    #[error("conflict on key '{key}': expected {expected}, found {}", match .actual { Some(r) => format!("revision {r}"), None => "no key".to_string() })]
    Conflict {
        key: String,
        expected: Expect,
        actual: Option<u64>,
    },
    /// A transaction names the same key twice.
    #[error("transaction writes key '{0}' more than once")]
    DuplicateKey(String),
    /// The state file is in use by another process (another controller on the same data dir).
    #[error("state store {path} is already open in another process")]
    Locked { path: String },
    /// The backend failed (I/O, corruption, ...).
    #[error("state store {op} failed: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A revisioned key-value store with compare-and-swap writes.
///
/// Implementations are internally synchronised and cheap enough to call from async code
/// (an embedded commit is one fsync).
pub trait StateStore: Send + Sync {
    /// The value of `key` and its modification revision.
    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>>;

    /// Writes `key` if `expect` holds; returns the new store revision (the key's new
    /// modification revision).
    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<u64> {
        self.txn(vec![TxnOp::put(key, value, expect)])
    }

    /// Deletes `key` if `expect` holds. Returns the new store revision if a key was deleted,
    /// `None` if there was nothing to delete (the revision is then unchanged).
    fn delete(&self, key: &str, expect: Expect) -> Result<Option<u64>>;

    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;

    /// The store revision: the number of successful writes so far (0 for a new store).
    fn revision(&self) -> Result<u64>;

    /// Checks every precondition, then applies every write, atomically at one new revision
    /// (returned). An empty transaction, or one of only checks, writes nothing and returns the
    /// current revision. Deleting an absent key (with a precondition that holds) is allowed.
    fn txn(&self, ops: Vec<TxnOp>) -> Result<u64>;
}

impl<T: StateStore + ?Sized> StateStore for std::sync::Arc<T> {
    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
        (**self).get(key)
    }
    fn put(&self, key: &str, value: &[u8], expect: Expect) -> Result<u64> {
        (**self).put(key, value, expect)
    }
    fn delete(&self, key: &str, expect: Expect) -> Result<Option<u64>> {
        (**self).delete(key, expect)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        (**self).list(prefix)
    }
    fn revision(&self) -> Result<u64> {
        (**self).revision()
    }
    fn txn(&self, ops: Vec<TxnOp>) -> Result<u64> {
        (**self).txn(ops)
    }
}

/// Refuses a transaction that names one key twice (the outcome would depend on order).
fn check_unique_keys(ops: &[TxnOp]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for op in ops {
        if !seen.insert(op.key()) {
            return Err(StoreError::DuplicateKey(op.key().to_string()));
        }
    }
    Ok(())
}

fn conflict(key: &str, expected: Expect, actual: Option<u64>) -> StoreError {
    StoreError::Conflict {
        key: key.to_string(),
        expected,
        actual,
    }
}

/// The conformance suite every backend must pass (`cargo test` runs it for the built-in ones;
/// enable feature `conformance` to run it against another backend).
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_conforms() {
        conformance::check_all(&MemoryStore::new());
    }

    #[test]
    fn redb_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("state.redb")).unwrap();
        conformance::check_all(&store);
    }

    #[test]
    fn shared_store_conforms() {
        let store: std::sync::Arc<dyn StateStore> = std::sync::Arc::new(MemoryStore::new());
        conformance::check_all(&store);
    }

    #[test]
    fn redb_store_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        conformance::check_persistence(|| RedbStore::open(&path).unwrap());
    }

    #[test]
    fn redb_store_refuses_a_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = RedbStore::open(&path).unwrap();
        match RedbStore::open(&path) {
            Err(StoreError::Locked { path: p }) => assert!(p.contains("state.redb")),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("expected Locked, got a second store"),
        }
    }

    #[test]
    fn redb_store_reports_a_garbage_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        std::fs::write(&path, b"this is not a database, just some bytes").unwrap();
        let err = RedbStore::open(&path).err().expect("garbage must not open");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }
}
