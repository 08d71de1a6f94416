//! Embedded [`StateStore`] on redb: one file, crash-safe (a commit is atomic and durable; a
//! crash leaves the last committed state).
//!
//! Layout: table `kv` maps a key to `revision (u64 LE) ++ value`; table `meta` holds the store
//! revision under `revision`.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use crate::{Entry, Expect, Result, StateStore, StoreError, TxnOp, check_unique_keys, conflict};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

/// A [`StateStore`] in a redb database file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn backend<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: Box::new(e),
    }
}

fn encode(rev: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&rev.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<(u64, Vec<u8>)> {
    let Some((rev, value)) = raw.split_first_chunk::<8>() else {
        return Err(StoreError::Backend {
            op: "decode",
            source: format!("record of key '{key}' is shorter than its revision header").into(),
        });
    };
    Ok((u64::from_le_bytes(*rev), value.to_vec()))
}

impl RedbStore {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.display().to_string(),
            },
            other => StoreError::Backend {
                op: "open",
                source: format!("{}: {other}", path.display()).into(),
            },
        })?;
        let txn = db.begin_write().map_err(backend("open"))?;
        {
            txn.open_table(KV).map_err(backend("open"))?;
            let mut meta = txn.open_table(META).map_err(backend("open"))?;
            let has_rev = meta.get(REVISION_KEY).map_err(backend("open"))?.is_some();
            if !has_rev {
                meta.insert(REVISION_KEY, 0).map_err(backend("open"))?;
            }
        }
        txn.commit().map_err(backend("open"))?;
        Ok(RedbStore { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StateStore for RedbStore {
    fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(backend("get"))?;
        let table = txn.open_table(KV).map_err(backend("get"))?;
        match table.get(key).map_err(backend("get"))? {
            Some(raw) => decode(key, raw.value()).map(Some),
            None => Ok(None),
        }
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<Option<u64>> {
        let txn = self.db.begin_write().map_err(backend("delete"))?;
        let rev;
        {
            let mut table = txn.open_table(KV).map_err(backend("delete"))?;
            let current = match table.get(key).map_err(backend("delete"))? {
                Some(raw) => Some(decode(key, raw.value())?.0),
                None => None,
            };
            if !expect.holds(current) {
                return Err(conflict(key, expect, current));
            }
            if current.is_none() {
                return Ok(None);
            }
            let mut meta = txn.open_table(META).map_err(backend("delete"))?;
            rev = meta
                .get(REVISION_KEY)
                .map_err(backend("delete"))?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            meta.insert(REVISION_KEY, rev).map_err(backend("delete"))?;
            table.remove(key).map_err(backend("delete"))?;
        }
        txn.commit().map_err(backend("commit"))?;
        Ok(Some(rev))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read().map_err(backend("list"))?;
        let table = txn.open_table(KV).map_err(backend("list"))?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(backend("list"))? {
            let (k, v) = item.map_err(backend("list"))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (revision, value) = decode(key, v.value())?;
            out.push(Entry {
                key: key.to_string(),
                revision,
                value,
            });
        }
        Ok(out)
    }

    fn revision(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(backend("revision"))?;
        let meta = txn.open_table(META).map_err(backend("revision"))?;
        Ok(meta
            .get(REVISION_KEY)
            .map_err(backend("revision"))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn txn(&self, ops: Vec<TxnOp>) -> Result<u64> {
        check_unique_keys(&ops)?;
        // An uncommitted write transaction is aborted on drop, so every early return below
        // leaves the database unchanged.
        let txn = self.db.begin_write().map_err(backend("txn"))?;
        let rev;
        {
            let mut table = txn.open_table(KV).map_err(backend("txn"))?;
            let mut meta = txn.open_table(META).map_err(backend("txn"))?;
            let current_rev = meta
                .get(REVISION_KEY)
                .map_err(backend("txn"))?
                .map(|v| v.value())
                .unwrap_or(0);
            for op in &ops {
                let current = match table.get(op.key()).map_err(backend("txn"))? {
                    Some(raw) => Some(decode(op.key(), raw.value())?.0),
                    None => None,
                };
                if !op.expect().holds(current) {
                    return Err(conflict(op.key(), op.expect(), current));
                }
            }
            if ops.iter().all(|op| matches!(op, TxnOp::Check { .. })) {
                return Ok(current_rev);
            }
            rev = current_rev + 1;
            for op in &ops {
                match op {
                    TxnOp::Put { key, value, .. } => {
                        table
                            .insert(key.as_str(), encode(rev, value).as_slice())
                            .map_err(backend("txn"))?;
                    }
                    TxnOp::Delete { key, .. } => {
                        table.remove(key.as_str()).map_err(backend("txn"))?;
                    }
                    TxnOp::Check { .. } => {}
                }
            }
            meta.insert(REVISION_KEY, rev).map_err(backend("txn"))?;
        }
        txn.commit().map_err(backend("commit"))?;
        Ok(rev)
    }
}
