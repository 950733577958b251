//! The embedded store: one redb file under the state directory. redb commits
//! are crash-safe (copy-on-write B-trees, fsync on commit), which gives the
//! all-or-nothing apply and survival across SIGKILL.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Change, Store, StoreError, StoredDoc};

const DOCUMENTS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("documents");
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION: &str = "version";

/// [`Store`] on a redb database file.
pub struct RedbStore {
    db: Database,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(DOCUMENTS).map_err(backend)?;
            txn.open_table(MODULES).map_err(backend)?;
            txn.open_table(META).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        Ok(meta.get(VERSION).map_err(backend)?.map_or(0, |v| v.value()))
    }

    fn documents(&self) -> Result<(u64, Vec<StoredDoc>), StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let version = meta.get(VERSION).map_err(backend)?.map_or(0, |v| v.value());
        let table = txn.open_table(DOCUMENTS).map_err(backend)?;
        let mut docs = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let (written, json) = value.value();
            docs.push(StoredDoc {
                key: key.value().to_string(),
                json: json.to_string(),
                version: written,
            });
        }
        Ok((version, docs))
    }

    fn commit(&self, expected: u64, changes: &[Change]) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let next;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let actual = meta.get(VERSION).map_err(backend)?.map_or(0, |v| v.value());
            if actual != expected {
                return Err(StoreError::Conflict { expected, actual });
            }
            next = actual + 1;
            meta.insert(VERSION, next).map_err(backend)?;
            let mut docs = txn.open_table(DOCUMENTS).map_err(backend)?;
            for change in changes {
                match change {
                    Change::Put { key, json } => {
                        docs.insert(key.as_str(), (next, json.as_str()))
                            .map_err(backend)?;
                    }
                    Change::Delete { key } => {
                        docs.remove(key.as_str()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)?;
        Ok(next)
    }

    fn put_module(&self, sha256: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let new;
        {
            let mut modules = txn.open_table(MODULES).map_err(backend)?;
            new = modules.get(sha256).map_err(backend)?.is_none();
            if new {
                modules.insert(sha256, bytes).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)?;
        Ok(new)
    }

    fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let modules = txn.open_table(MODULES).map_err(backend)?;
        Ok(modules
            .get(sha256)
            .map_err(backend)?
            .map(|v| v.value().to_vec()))
    }

    fn has_module(&self, sha256: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let modules = txn.open_table(MODULES).map_err(backend)?;
        Ok(modules.get(sha256).map_err(backend)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, json: &str) -> Change {
        Change::Put {
            key: key.into(),
            json: json.into(),
        }
    }

    #[test]
    fn commits_are_versioned_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            assert_eq!(store.version().unwrap(), 0);
            assert_eq!(store.commit(0, &[put("a", "1"), put("b", "2")]).unwrap(), 1);
            assert_eq!(
                store
                    .commit(1, &[put("a", "3"), Change::Delete { key: "b".into() }])
                    .unwrap(),
                2
            );
        }
        let store = RedbStore::open(&path).unwrap();
        let (version, docs) = store.documents().unwrap();
        assert_eq!(version, 2);
        assert_eq!(
            docs,
            vec![StoredDoc {
                key: "a".into(),
                json: "3".into(),
                version: 2
            }]
        );
    }

    #[test]
    fn a_stale_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("mesh.redb")).unwrap();
        store.commit(0, &[put("a", "1")]).unwrap();
        let err = store
            .commit(0, &[put("a", "2"), put("c", "3")])
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 1
            }
        ));
        let (version, docs) = store.documents().unwrap();
        assert_eq!((version, docs.len(), docs[0].json.as_str()), (1, 1, "1"));
    }

    #[test]
    fn modules_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("mesh.redb")).unwrap();
        assert!(store.put_module("aa", b"wasm").unwrap());
        assert!(!store.put_module("aa", b"wasm").unwrap());
        assert_eq!(store.module("aa").unwrap().as_deref(), Some(&b"wasm"[..]));
        assert!(!store.has_module("bb").unwrap());
    }
}
