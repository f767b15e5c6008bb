//! The daemon's embedded store (redb): VM records, API tokens, and counters.
//! Every change is one committed transaction, so a daemon killed at any
//! point leaves either the old record or the new one.

use crate::auth::TokenRecord;
use crate::model::VmRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long [`Store::open`] waits for the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

const VMS: TableDefinition<&str, &str> = TableDefinition::new("vms");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// First uid handed to a VMM; each VM gets the next.
pub const FIRST_VM_UID: u64 = 400_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(String),
    #[error("store: corrupt record {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("a VM named {name} already exists in project {project}")]
    NameTaken { project: String, name: String },
    #[error("no such record")]
    NotFound,
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.to_string())
            }
        }
    )*};
}
db_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub struct Store {
    db: Database,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    /// Opens the store, waiting up to `wait` for its lock. A daemon started
    /// again right after kill -9 found it held for a moment (seen in the
    /// kill -9 test; which process held it was not found): waiting turns
    /// that into a short delay, and a second daemon on the same store still
    /// fails, after `wait`.
    pub fn open_waiting(path: &Path, wait: Duration) -> Result<Store, StoreError> {
        let deadline = Instant::now() + wait;
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                result => break result?,
            }
        };
        let tx = db.begin_write()?;
        tx.open_table(VMS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// Adds a VM; its name must be new in its project.
    pub fn create_vm(&self, record: &VmRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(VMS)?;
            for entry in table.iter()? {
                let (key, value) = entry?;
                let other: VmRecord = decode(key.value(), value.value())?;
                if other.project == record.project && other.spec.name == record.spec.name {
                    return Err(StoreError::NameTaken {
                        project: record.project.clone(),
                        name: record.spec.name.clone(),
                    });
                }
            }
            table.insert(record.id.as_str(), encode(record).as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VMS)?;
        let value = table.get(id)?;
        value.map(|v| decode(id, v.value())).transpose()
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VMS)?;
        let mut records = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            records.push(decode(key.value(), value.value())?);
        }
        records.sort_by(|a: &VmRecord, b: &VmRecord| {
            (a.created_at, &a.id).cmp(&(b.created_at, &b.id))
        });
        Ok(records)
    }

    /// Changes a VM's record in one transaction and returns the new record.
    pub fn update_vm(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, StoreError> {
        let tx = self.db.begin_write()?;
        let record = {
            let mut table = tx.open_table(VMS)?;
            let mut record: VmRecord = match table.get(id)? {
                Some(value) => decode(id, value.value())?,
                None => return Err(StoreError::NotFound),
            };
            change(&mut record);
            table.insert(id, encode(&record).as_str())?;
            record
        };
        tx.commit()?;
        Ok(record)
    }

    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(VMS)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// The next unused VM uid.
    pub fn allocate_uid(&self) -> Result<u32, StoreError> {
        let tx = self.db.begin_write()?;
        let uid = {
            let mut table = tx.open_table(COUNTERS)?;
            let next = table
                .get("next_vm_uid")?
                .map(|v| v.value())
                .unwrap_or(FIRST_VM_UID);
            table.insert("next_vm_uid", next + 1)?;
            next
        };
        tx.commit()?;
        u32::try_from(uid).map_err(|_| StoreError::Database("VM uids exhausted".into()))
    }

    pub fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(TOKENS)?
            .insert(token.id.as_str(), encode(token).as_str())?;
        tx.commit()?;
        Ok(())
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TOKENS)?;
        let value = table.get(id)?;
        value.map(|v| decode(id, v.value())).transpose()
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TOKENS)?;
        let mut tokens = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            tokens.push(decode(key.value(), value.value())?);
        }
        Ok(tokens)
    }

    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(TOKENS)?.remove(id)?.is_some();
        tx.commit()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmState;

    fn record(id: &str, project: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            project: project.into(),
            spec: serde_json::from_value(serde_json::json!({ "name": name })).unwrap(),
            state: VmState::Stopped,
            uid: 1,
            created_at: 0,
            pid: None,
            last_exit: None,
        }
    }

    #[test]
    fn a_held_store_is_waited_for_until_the_holder_lets_go_and_no_longer() {
        let path =
            std::env::temp_dir().join(format!("bulkhead-store-lock-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let holder = Store::open(&path).unwrap();
        let error = Store::open_waiting(&path, Duration::from_millis(200))
            .err()
            .expect("a second open while the first holds the lock");
        assert!(error.to_string().contains("already open"), "{error}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(holder);
        });
        let started = Instant::now();
        Store::open_waiting(&path, Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        release.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn records_survive_reopening_and_names_are_unique_per_project() {
        let path = std::env::temp_dir().join(format!("bulkhead-store-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let store = Store::open(&path).unwrap();
            store.create_vm(&record("1", "a", "web")).unwrap();
            store.create_vm(&record("2", "b", "web")).unwrap();
            assert!(matches!(
                store.create_vm(&record("3", "a", "web")),
                Err(StoreError::NameTaken { .. })
            ));
            store
                .update_vm("1", |r| r.state = VmState::Running)
                .unwrap();
            assert_eq!(store.allocate_uid().unwrap(), FIRST_VM_UID as u32);
            assert!(matches!(
                store.update_vm("9", |_| {}),
                Err(StoreError::NotFound)
            ));
        }
        let store = Store::open(&path).unwrap();
        let vms = store.vms().unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(store.vm("1").unwrap().unwrap().state, VmState::Running);
        assert_eq!(store.allocate_uid().unwrap(), FIRST_VM_UID as u32 + 1);
        store.delete_vm("1").unwrap();
        assert!(store.vm("1").unwrap().is_none());
        let _ = std::fs::remove_file(&path);
    }
}
