//! openraft's own storage conformance suite against the RocksDB log store and state machine.
#![allow(clippy::unwrap_used)] // tests may unwrap

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use plinth_raft::{LogStore, StateMachine, TypeConfig};
use plinth_storage::Store;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, _) = tokio::sync::broadcast::channel(16);
        let sm = StateMachine::open(store.clone(), tx).unwrap();
        Ok((dir, LogStore::new(store), sm))
    }
}

#[test]
fn t10_openraft_storage_suite() {
    Suite::test_all(RocksBuilder).unwrap();
}
