//! The embedded store: one redb file under the state directory. redb commits
//! are crash-safe (copy-on-write B-trees, fsync on commit), which gives the
//! all-or-nothing apply and survival across SIGKILL.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    Change, EXPIRED_JOIN_TOKENS_KEPT_MS, JoinRecord, Redeemed, Store, StoreError, StoredDoc,
};

const DOCUMENTS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("documents");
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// sha256 (hex) of a join token → (namespace, service, created, expires,
/// used (Unix ms, 0: not yet), used by).
type JoinRow<'a> = (&'a str, &'a str, u64, u64, u64, &'a str);
const JOIN_TOKENS: TableDefinition<&str, JoinRow> = TableDefinition::new("join_tokens");
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
            txn.open_table(JOIN_TOKENS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

fn join_record(
    (namespace, service, created_ms, expires_ms, used_ms, used_by): JoinRow,
) -> JoinRecord {
    JoinRecord {
        namespace: namespace.to_string(),
        service: service.to_string(),
        created_ms,
        expires_ms,
        used_ms,
        used_by: used_by.to_string(),
    }
}

fn join_row(r: &JoinRecord) -> JoinRow<'_> {
    (
        &r.namespace,
        &r.service,
        r.created_ms,
        r.expires_ms,
        r.used_ms,
        &r.used_by,
    )
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

    fn put_join_token(&self, sha256: &str, record: &JoinRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut tokens = txn.open_table(JOIN_TOKENS).map_err(backend)?;
            let horizon = record
                .created_ms
                .saturating_sub(EXPIRED_JOIN_TOKENS_KEPT_MS);
            tokens
                .retain(|_, (_, _, _, expires_ms, _, _)| expires_ms >= horizon)
                .map_err(backend)?;
            tokens.insert(sha256, join_row(record)).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn redeem_join_token(
        &self,
        sha256: &str,
        namespace: &str,
        service: &str,
        node: &str,
        now_ms: u64,
    ) -> Result<Redeemed, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let redeemed;
        {
            let mut tokens = txn.open_table(JOIN_TOKENS).map_err(backend)?;
            let Some(record) = tokens
                .get(sha256)
                .map_err(backend)?
                .map(|row| join_record(row.value()))
            else {
                return Ok(Redeemed::Unknown);
            };
            if record.used_ms != 0 {
                return Ok(Redeemed::Replayed(record));
            }
            if now_ms >= record.expires_ms {
                return Ok(Redeemed::Expired(record));
            }
            if record.namespace != namespace || record.service != service {
                return Ok(Redeemed::WrongService(record));
            }
            let used = JoinRecord {
                used_ms: now_ms.max(1),
                used_by: node.to_string(),
                ..record
            };
            tokens.insert(sha256, join_row(&used)).map_err(backend)?;
            redeemed = Redeemed::Joined(used);
        }
        txn.commit().map_err(backend)?;
        Ok(redeemed)
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

    fn token(service: &str, created_ms: u64, expires_ms: u64) -> JoinRecord {
        JoinRecord {
            namespace: "default".into(),
            service: service.into(),
            created_ms,
            expires_ms,
            used_ms: 0,
            used_by: String::new(),
        }
    }

    #[test]
    fn a_join_token_is_redeemed_once_for_its_service_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store
                .put_join_token("aa", &token("orders", 10, 100))
                .unwrap();
            store
                .put_join_token("bb", &token("orders", 10, 50))
                .unwrap();
            let redeem = |sha: &str, service: &str, now: u64| {
                store
                    .redeem_join_token(sha, "default", service, "orders-1", now)
                    .unwrap()
            };
            assert!(
                matches!(redeem("aa", "payments", 20), Redeemed::WrongService(r) if r.used_ms == 0)
            );
            assert!(matches!(redeem("bb", "orders", 50), Redeemed::Expired(_)));
            assert_eq!(redeem("cc", "orders", 20), Redeemed::Unknown);
            assert!(matches!(redeem("aa", "orders", 20), Redeemed::Joined(r) if r.used_ms == 20));
        }
        // Used, and still so after reopening.
        let store = RedbStore::open(&path).unwrap();
        match store
            .redeem_join_token("aa", "default", "orders", "orders-2", 30)
            .unwrap()
        {
            Redeemed::Replayed(r) => assert_eq!((r.used_ms, r.used_by.as_str()), (20, "orders-1")),
            other => panic!("{other:?}"),
        }
        // Long expired tokens are dropped when another is made.
        let later = 50 + EXPIRED_JOIN_TOKENS_KEPT_MS + 1;
        store
            .put_join_token("dd", &token("orders", later, later + 10))
            .unwrap();
        assert_eq!(
            store
                .redeem_join_token("bb", "default", "orders", "n", later)
                .unwrap(),
            Redeemed::Unknown
        );
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
