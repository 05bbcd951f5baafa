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

mod snapshot_point {
    use std::io::Cursor;

    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use plinth_spiffe::{Selectors, SpiffeId};
    use plinth_storage::{Command, Proposal, RegistrationEntry};

    use super::*;

    pub(super) fn create(index: u64) -> Entry<TypeConfig> {
        let entry = RegistrationEntry::new(
            format!("entry-{index}"),
            SpiffeId::new(&format!("spiffe://example.org/w/{index}")).unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            // A long selector, so that a copy of the state would show in the file's size.
            Selectors::parse_all(&[format!("unix:path:/{}{index}", "x".repeat(2000))]).unwrap(),
        );
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal::at(
                1_700_000_000,
                Command::EntryCreate { entry },
            )),
        }
    }

    fn open(dir: &std::path::Path) -> (Store, StateMachine) {
        let store = Store::open(dir).unwrap();
        let (tx, _) = tokio::sync::broadcast::channel(16);
        let sm = StateMachine::open(store.clone(), tx).unwrap();
        (store, sm)
    }

    #[tokio::test]
    async fn t20_a_snapshot_point_copies_nothing_and_a_sent_snapshot_is_the_state_now() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut sm) = open(&dir.path().join("a"));
        assert!(
            sm.get_current_snapshot().await.unwrap().is_none(),
            "no point yet"
        );
        sm.apply((1..=50).map(create)).await.unwrap();

        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(50));
        let file = std::fs::metadata(store.snapshot_path()).unwrap().len();
        assert!(
            file < 4096,
            "the point holds metadata only, not the ~100 KB state: {file} bytes"
        );

        // Applied on after the point: a snapshot sent now is the state now, not at the point.
        sm.apply((51..=60).map(create)).await.unwrap();
        let sent = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(sent.meta.last_log_id.map(|l| l.index), Some(60));
        assert_ne!(sent.meta.snapshot_id, built.meta.snapshot_id);

        // Installed on another node, it gives the same entries and applied state.
        let (other_store, mut other) = open(&dir.path().join("b"));
        let data: Box<Cursor<Vec<u8>>> = sent.snapshot;
        other.install_snapshot(&sent.meta, data).await.unwrap();
        assert_eq!(
            other.applied_state().await.unwrap().0,
            sent.meta.last_log_id
        );
        let ids = |s: &Store| {
            let mut v: Vec<String> = s
                .list_entries()
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&other_store).len(), 60);
        assert_eq!(ids(&other_store), ids(&store));
        // Its own point is the installed snapshot, and what it would send on is that state.
        let again = other.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(again.meta.last_log_id, sent.meta.last_log_id);
        assert_eq!(again.meta.snapshot_id, sent.meta.snapshot_id);
    }
}

mod trust_watch {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use plinth_spiffe::{KeyType, PrivateKey, Signer, TrustDomain};
    use plinth_storage::{Command, Proposal, StoredJwtAuthority};

    use super::snapshot_point::create;
    use super::*;

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal::at(1_700_000_000, command)),
        }
    }

    #[tokio::test]
    async fn t30_the_trust_watch_moves_on_bundle_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, mut all) = tokio::sync::broadcast::channel(16);
        let (trust_tx, mut trust) = tokio::sync::watch::channel(0);
        let mut sm = StateMachine::open(store, tx)
            .unwrap()
            .with_trust_watch(trust_tx);

        sm.apply([create(1), create(2)]).await.unwrap();
        assert_eq!(
            all.try_recv().unwrap().revision,
            1,
            "every change is published"
        );
        assert!(
            !trust.has_changed().unwrap(),
            "entries leave the watch alone"
        );

        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let append = Command::BundleAppend {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            x509_authorities: vec![],
            jwt_authorities: vec![StoredJwtAuthority {
                key_id: "k1".into(),
                public_key_spki: key.public_key_spki().to_vec(),
            }],
        };
        sm.apply([entry(3, append), create(4)]).await.unwrap();
        assert!(trust.has_changed().unwrap(), "a bundle change moves it");
        assert_eq!(*trust.borrow_and_update(), 3, "to that change's revision");
    }
}

mod close_signal {
    use super::*;

    /// The signal a node's shutdown waits for: it completes when the state machine, and with
    /// it its handle on the database, is dropped, and not before.
    #[tokio::test]
    async fn t40_the_close_signal_completes_when_the_state_machine_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        let (tx, _) = tokio::sync::broadcast::channel(16);
        let (sm, mut closed) = StateMachine::open(store, tx).unwrap().with_close_signal();
        assert_eq!(
            closed.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty),
            "open"
        );
        drop(sm);
        assert_eq!(
            closed.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed),
            "dropped"
        );
        // With every handle gone the database opens again at once.
        Store::open(dir.path().join("db")).unwrap();
    }
}
