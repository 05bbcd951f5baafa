#![allow(clippy::unwrap_used)] // tests may unwrap

//! Behaviour of the storage tables and of command application.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::x509::{self_signed_ca, CaTemplate};
use plinth_spiffe::{KeyType, PrivateKey, Selector, Selectors, SpiffeId, TrustDomain};
use plinth_storage::{
    AuthorityPublic, AuthorityStatus, BundleEndpointProfile, CaAuthority, Change, Command,
    CommandError, FederationRelationship, JoinToken, MetaKey, Outcome, Proposal, RegistrationEntry,
    Response, SnapshotFile, StorageError, Store, StoredBundle, StoredJwtAuthority,
};

struct Db {
    _dir: tempfile::TempDir,
    store: Store,
    index: u64,
}

impl Db {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("data")).unwrap();
        Self {
            _dir: dir,
            store,
            index: 0,
        }
    }

    fn apply_at(&mut self, now: i64, command: Command) -> Response {
        self.index += 1;
        let applied = self.index.to_be_bytes();
        self.store
            .apply(self.index, Some(&Proposal::at(now, command)), &applied)
            .unwrap()
            .response
    }

    fn apply(&mut self, command: Command) -> Response {
        self.apply_at(1_000, command)
    }

    fn ok(&mut self, command: Command) -> Outcome {
        let r = self.apply(command);
        r.result.unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn refused(&mut self, command: Command) -> CommandError {
        let before = self.store.revision().unwrap();
        let r = self.apply(command);
        assert_eq!(
            r.revision, before,
            "a refused command must not bump the revision"
        );
        r.result.expect_err("command should be refused")
    }
}

/// The stored entries' IDs, in the store's key order.
fn stored_ids(db: &Db) -> Vec<String> {
    db.store
        .list_entries()
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn sels(items: &[&str]) -> Selectors {
    Selectors::parse_all(items).unwrap()
}

fn entry(entry_id: &str, spiffe: &str, parent: &str, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry {
        x509_svid_ttl: 3600,
        jwt_svid_ttl: 300,
        ..RegistrationEntry::new(entry_id, id(spiffe), id(parent), sels(selectors))
    }
}

fn ca_cert(domain: &str) -> Vec<u8> {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let t = CaTemplate::new(
        td(domain),
        time::OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    );
    self_signed_ca(&t, Arc::new(key)).unwrap()
}

fn jwt_key(kid: &str) -> StoredJwtAuthority {
    use plinth_spiffe::Signer;
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    StoredJwtAuthority {
        key_id: kid.into(),
        public_key_spki: key.public_key_spki().to_vec(),
    }
}

#[test]
fn t10_data_dir_is_private_even_if_it_existed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/data");
    let _store = Store::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _store = Store::open(&loose).unwrap();
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn t10_a_limited_log_read_stops_at_a_byte_budget_but_returns_at_least_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.log_append((1..=10).map(|i| (i, vec![i as u8; 100])))
        .unwrap();
    let idx = |v: Vec<(u64, Vec<u8>)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    assert_eq!(idx(s.log_range_limited(2, 11, 300).unwrap()), vec![2, 3, 4]);
    assert_eq!(idx(s.log_range_limited(2, 11, 399).unwrap()), vec![2, 3, 4]);
    assert_eq!(idx(s.log_range_limited(2, 4, 10_000).unwrap()), vec![2, 3]);
    assert_eq!(idx(s.log_range_limited(9, 11, 1).unwrap()), vec![9]);
    assert_eq!(
        idx(s.log_range_limited(11, 20, 1000).unwrap()),
        Vec::<u64>::new()
    );
    let whole = s.log_range(2, Some(5)).unwrap();
    assert_eq!(s.log_range_limited(2, 11, 300).unwrap(), whole);
}

#[test]
fn t10_raft_log_append_read_truncate_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.log_append((1..=10).map(|i| (i, vec![i as u8]))).unwrap();
        assert_eq!(s.log_last().unwrap(), Some((10, vec![10])));
        let r = s.log_range(3, Some(6)).unwrap();
        assert_eq!(r.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4, 5]);
        s.log_truncate_from(8).unwrap();
        assert_eq!(s.log_last().unwrap().map(|(i, _)| i), Some(7));
        s.log_purge_upto(4, b"p4".to_vec()).unwrap();
        s.meta_put(MetaKey::Vote, b"vote".to_vec()).unwrap();
        s.meta_put(MetaKey::Committed, b"c7".to_vec()).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let r = s.log_range(0, None).unwrap();
    assert_eq!(r.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![5, 6, 7]);
    assert_eq!(
        s.meta_get(MetaKey::LastPurged).unwrap(),
        Some(b"p4".to_vec())
    );
    assert_eq!(s.meta_get(MetaKey::Vote).unwrap(), Some(b"vote".to_vec()));
    assert_eq!(
        s.meta_get(MetaKey::Committed).unwrap(),
        Some(b"c7".to_vec())
    );
    s.log_purge_upto(7, b"p7".to_vec()).unwrap();
    assert_eq!(s.log_last().unwrap(), None);
}

#[test]
fn t10_unsynced_log_appends_are_readable_at_once_and_kept_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.log_append_unsynced((1..=3).map(|i| (i, vec![i as u8])))
            .unwrap();
        // The committed index rides along with a later append.
        s.log_append_unsynced_with_meta(
            (4..=5).map(|i| (i, vec![i as u8])),
            (MetaKey::Committed, b"c3".to_vec()),
        )
        .unwrap();
        assert_eq!(
            s.meta_get(MetaKey::Committed).unwrap(),
            Some(b"c3".to_vec())
        );
        // Readable before any sync (Raft reads its own unflushed log).
        assert_eq!(s.log_last().unwrap(), Some((5, vec![5])));
        s.sync().unwrap();
    }
    {
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.meta_get(MetaKey::Committed).unwrap(),
            Some(b"c3".to_vec()),
            "the value written with the append was synced with it"
        );
        s.meta_put_unsynced(MetaKey::Committed, b"c5".to_vec())
            .unwrap();
        s.sync().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let r = s.log_range(0, None).unwrap();
    assert_eq!(
        r.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        s.meta_get(MetaKey::Committed).unwrap(),
        Some(b"c5".to_vec())
    );
}

#[test]
fn t20_entry_create_update_delete_maintain_indexes() {
    let mut db = Db::new();
    let parent = "spiffe://example.org/agent/a";
    let out = db.ok(Command::EntryCreate {
        entry: entry(
            "e1",
            "spiffe://example.org/web",
            parent,
            &["unix:uid:1000", "unix:gid:5"],
        ),
    });
    let Outcome::Entry { entry: e1 } = out else {
        panic!("{out:?}")
    };
    assert_eq!(e1.revision, 1);
    assert_eq!(e1.created_at, 1_000);
    let s = &db.store;
    assert_eq!(s.get_entry("e1").unwrap(), Some(e1.clone()));
    assert_eq!(s.entries_by_parent(&id(parent)).unwrap(), vec![e1.clone()]);
    assert_eq!(
        s.entries_by_spiffe_id(&id("spiffe://example.org/web"))
            .unwrap(),
        vec![e1.clone()]
    );
    let uid = Selector::parse("unix:uid:1000").unwrap();
    assert_eq!(s.entries_by_selector(&uid).unwrap(), vec![e1.clone()]);

    // Update moves the indexes.
    let mut changed = entry("e1", "spiffe://example.org/api", parent, &["unix:uid:2000"]);
    changed.hint = "api".into();
    let out = db.ok(Command::EntryUpdate {
        entry: changed,
        expected_revision: Some(1),
    });
    let Outcome::Entry { entry: e1b } = out else {
        panic!("{out:?}")
    };
    assert_eq!(e1b.revision, 2);
    assert_eq!(e1b.created_at, 1_000);
    let s = &db.store;
    assert!(s.entries_by_selector(&uid).unwrap().is_empty());
    assert!(s
        .entries_by_spiffe_id(&id("spiffe://example.org/web"))
        .unwrap()
        .is_empty());
    assert_eq!(
        s.entries_by_selector(&Selector::parse("unix:uid:2000").unwrap())
            .unwrap(),
        vec![e1b.clone()]
    );

    // A stale compare-and-set loses.
    let err = db.refused(Command::EntryUpdate {
        entry: entry("e1", "spiffe://example.org/x", parent, &["unix:uid:1"]),
        expected_revision: Some(1),
    });
    assert_eq!(
        err,
        CommandError::EntryRevisionMismatch {
            id: "e1".into(),
            expected: 1,
            actual: 2
        }
    );

    db.ok(Command::EntryDelete { id: "e1".into() });
    let s = &db.store;
    assert_eq!(s.get_entry("e1").unwrap(), None);
    assert!(s.entries_by_parent(&id(parent)).unwrap().is_empty());
    assert!(s
        .entries_by_selector(&Selector::parse("unix:uid:2000").unwrap())
        .unwrap()
        .is_empty());
    assert_eq!(
        db.refused(Command::EntryDelete { id: "e1".into() }),
        CommandError::EntryNotFound { id: "e1".into() }
    );
}

#[test]
fn t20_entries_without_an_id_are_numbered_in_log_order() {
    const T: i64 = 1_700_000_000_123; // 0x18bcfe5687b
    let mut db = Db::new();
    let w = |n: u32, id: &str| {
        entry(
            id,
            &format!("spiffe://example.org/w/{n}"),
            "spiffe://example.org/agent",
            &["unix:uid:1"],
        )
    };
    let made = |r: Response| match r.result {
        Ok(Outcome::Entry { entry }) => entry.id,
        other => panic!("{other:?}"),
    };
    let create_at = |db: &mut Db, ms: i64, e: RegistrationEntry| {
        db.index += 1;
        let applied = db.index.to_be_bytes();
        let p = Proposal::at_millis(ms, Command::EntryCreate { entry: e });
        db.store
            .apply(db.index, Some(&p), &applied)
            .unwrap()
            .response
    };
    let base = "018bcfe5-687b-7000-8000-00000000000";
    // Two in one millisecond: the counter tells them apart.
    assert_eq!(made(create_at(&mut db, T, w(1, ""))), format!("{base}0"));
    assert_eq!(made(create_at(&mut db, T, w(2, ""))), format!("{base}1"));
    // An ID the client chose is kept, even the one the store would make next, which is then
    // passed over.
    let chosen = format!("{base}2");
    assert_eq!(made(create_at(&mut db, T, w(3, &chosen))), chosen);
    assert_eq!(made(create_at(&mut db, T, w(4, ""))), format!("{base}3"));
    // A refused create uses up no ID.
    let before = db.store.revision().unwrap();
    let r = create_at(&mut db, T, w(1, ""));
    assert!(matches!(r.result, Err(CommandError::EntryConflict { .. })));
    assert_eq!(db.store.revision().unwrap(), before);
    // A batch from a leader whose clock is 10 s behind: IDs keep growing, in command order and
    // in request order inside an entry batch (a refused item there uses up its ID).
    db.index += 1;
    let batch = Proposal::at_millis(
        T - 10_000,
        Command::Batch {
            commands: vec![
                Command::EntryCreate { entry: w(5, "") },
                Command::EntryCreateBatch {
                    entries: vec![w(6, ""), w(6, ""), w(7, "")],
                },
            ],
        },
    );
    let applied = db
        .store
        .apply(db.index, Some(&batch), &db.index.to_be_bytes())
        .unwrap();
    let Ok(Outcome::Batch { responses }) = applied.response.result else {
        panic!("{:?}", applied.response)
    };
    assert_eq!(made(responses[0].clone()), format!("{base}4"));
    let Ok(Outcome::EntryBatch { results }) = &responses[1].result else {
        panic!("{:?}", responses[1])
    };
    assert_eq!(results[0].as_ref().unwrap().id, format!("{base}5"));
    assert!(matches!(
        results[1],
        Err(CommandError::EntryConflict { .. })
    ));
    assert_eq!(results[2].as_ref().unwrap().id, format!("{base}7"));
    // A later millisecond starts the counter again.
    assert_eq!(
        made(create_at(&mut db, T + 1, w(8, ""))),
        "018bcfe5-687c-7000-8000-000000000000"
    );
    // Exactly the created entries are stored, and their key order is creation order.
    let mut expected: Vec<String> = (0..8)
        .filter(|c| *c != 6)
        .map(|c| format!("{base}{c}"))
        .collect();
    expected.push("018bcfe5-687c-7000-8000-000000000000".into());
    assert_eq!(stored_ids(&db), expected);

    // A snapshot carries the last ID made: a server installing it goes on from there.
    let (data, _) = db.store.export_state().unwrap();
    let mut other = Db::new();
    other.store.import_state(&data).unwrap();
    other.index = db.index;
    assert_eq!(
        made(create_at(&mut other, T, w(9, ""))),
        "018bcfe5-687c-7000-8000-000000000001"
    );
    // An update still needs the ID.
    let r = db.apply(Command::EntryUpdate {
        entry: w(1, ""),
        expected_revision: None,
    });
    assert!(
        matches!(r.result, Err(CommandError::EntryNotFound { .. })),
        "{r:?}"
    );
}

#[test]
fn t20_conflicting_entries_are_refused() {
    let mut db = Db::new();
    let p = "spiffe://example.org/agent/a";
    db.ok(Command::EntryCreate {
        entry: entry("e1", "spiffe://example.org/web", p, &["unix:uid:1000"]),
    });
    assert_eq!(
        db.refused(Command::EntryCreate {
            entry: entry("e2", "spiffe://example.org/web", p, &["unix:uid:1000"]),
        }),
        CommandError::EntryConflict {
            existing_id: "e1".into()
        }
    );
    assert_eq!(
        db.refused(Command::EntryCreate {
            entry: entry("e1", "spiffe://example.org/other", p, &["unix:uid:1"]),
        }),
        CommandError::EntryIdExists { id: "e1".into() }
    );
    assert_eq!(
        db.refused(Command::EntryCreate {
            entry: entry("e3", "spiffe://example.org/web", p, &[]),
        }),
        CommandError::EntryWithoutSelectors
    );
    // Same ID under another parent or with other selectors is fine.
    db.ok(Command::EntryCreate {
        entry: entry("e4", "spiffe://example.org/web", p, &["unix:uid:1001"]),
    });
    // Updating e4 into e1's mapping is a conflict too.
    assert_eq!(
        db.refused(Command::EntryUpdate {
            entry: entry("e4", "spiffe://example.org/web", p, &["unix:uid:1000"]),
            expected_revision: None,
        }),
        CommandError::EntryConflict {
            existing_id: "e1".into()
        }
    );
    assert_eq!(db.store.list_entries().unwrap().len(), 2);
}

/// The IDs of `entries`, sorted.
fn ids_of(entries: Vec<RegistrationEntry>) -> Vec<String> {
    let mut ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
    ids.sort();
    ids
}

#[test]
fn t20_index_reads_and_conflict_checks_see_every_table_file() {
    // The index tables have prefix filters (a key's value up to its NUL). Values here are
    // string prefixes of one another, and their keys are spread over two flushed table files
    // and the memtables: every read must still find all of a value's keys, and only those.
    let mut db = Db::new();
    let (p1, p2, p3) = (
        "spiffe://example.org/agent/a",
        "spiffe://example.org/agent/a/b",
        "spiffe://example.org/agent/ab",
    );
    let (w1, w2, w3) = (
        "spiffe://example.org/web",
        "spiffe://example.org/web/2",
        "spiffe://example.org/webx",
    );
    let create = |db: &mut Db, e: RegistrationEntry| {
        db.ok(Command::EntryCreate { entry: e });
    };
    create(&mut db, entry("e1", w1, p1, &["unix:uid:1"]));
    create(&mut db, entry("e2", w2, p2, &["unix:uid:10"]));
    db.store.persist_state().unwrap();
    create(&mut db, entry("e3", w1, p1, &["unix:uid:10"]));
    create(&mut db, entry("e4", w3, p3, &["unix:uid:1"]));
    db.store.persist_state().unwrap();
    create(&mut db, entry("e5", w1, p2, &["unix:uid:1"]));

    let check = |db: &Db| {
        let s = &db.store;
        let by_id = |v: &str| ids_of(s.entries_by_spiffe_id(&id(v)).unwrap());
        assert_eq!(by_id(w1), ["e1", "e3", "e5"]);
        assert_eq!(by_id(w2), ["e2"]);
        assert_eq!(by_id(w3), ["e4"]);
        assert!(by_id("spiffe://example.org/we").is_empty());
        let by_parent = |v: &str| ids_of(s.entries_by_parent(&id(v)).unwrap());
        assert_eq!(by_parent(p1), ["e1", "e3"]);
        assert_eq!(by_parent(p2), ["e2", "e5"]);
        assert_eq!(by_parent(p3), ["e4"]);
        assert_eq!(
            ids_of(s.entries_by_parents(&[id(p3), id(p1)]).unwrap()),
            ["e1", "e3", "e4"]
        );
        let by_sel = |v: &str| ids_of(s.entries_by_selector(&Selector::parse(v).unwrap()).unwrap());
        assert_eq!(by_sel("unix:uid:1"), ["e1", "e4", "e5"]);
        assert_eq!(by_sel("unix:uid:10"), ["e2", "e3"]);
        assert_eq!(stored_ids(db), ["e1", "e2", "e3", "e4", "e5"]);
    };
    check(&db);

    // The conflicts are in the first table file.
    assert_eq!(
        db.refused(Command::EntryCreate {
            entry: entry("e6", w1, p1, &["unix:uid:1"]),
        }),
        CommandError::EntryConflict {
            existing_id: "e1".into()
        }
    );
    assert_eq!(
        db.refused(Command::EntryCreate {
            entry: entry("e7", w2, p2, &["unix:uid:10"]),
        }),
        CommandError::EntryConflict {
            existing_id: "e2".into()
        }
    );

    // A snapshot of the state in files and memtables holds every key.
    let (data, _) = db.store.export_state().unwrap();
    let copy = Db::new();
    copy.store.import_state(&data).unwrap();
    check(&copy);
}

#[test]
fn t20_entry_batch_checks_each_entry_against_the_store_and_the_batch() {
    let mut db = Db::new();
    let p = "spiffe://example.org/agent/a";
    db.ok(Command::EntryCreate {
        entry: entry("e1", "spiffe://example.org/web", p, &["unix:uid:1000"]),
    });
    let before = db.store.revision().unwrap();
    let r = db.apply(Command::EntryCreateBatch {
        entries: vec![
            entry("b1", "spiffe://example.org/a", p, &["unix:uid:1"]),
            // Same mapping as e1, which is in the store.
            entry("b2", "spiffe://example.org/web", p, &["unix:uid:1000"]),
            // Same ID as b1, earlier in this batch.
            entry("b1", "spiffe://example.org/b", p, &["unix:uid:2"]),
            // Same mapping as b1, earlier in this batch.
            entry("b3", "spiffe://example.org/a", p, &["unix:uid:1"]),
            entry("b4", "spiffe://example.org/c", p, &[]),
            entry("b5", "spiffe://example.org/c", p, &["unix:uid:3"]),
        ],
    });
    let Ok(Outcome::EntryBatch { results }) = r.result else {
        panic!("unexpected outcome: {r:?}");
    };
    assert_eq!(r.revision, before + 1, "one log entry, one revision");
    let errors: Vec<Option<CommandError>> = results.iter().map(|x| x.clone().err()).collect();
    assert_eq!(
        errors,
        vec![
            None,
            Some(CommandError::EntryConflict {
                existing_id: "e1".into()
            }),
            Some(CommandError::EntryIdExists { id: "b1".into() }),
            Some(CommandError::EntryConflict {
                existing_id: "b1".into()
            }),
            Some(CommandError::EntryWithoutSelectors),
            None,
        ]
    );
    let b1 = results[0].as_ref().unwrap();
    assert_eq!(b1.revision, before + 1);
    assert_eq!(b1.spiffe_id, id("spiffe://example.org/a"));
    // Exactly the accepted entries are stored and indexed.
    let mut stored = stored_ids(&db);
    stored.sort();
    assert_eq!(stored, vec!["b1", "b5", "e1"]);
    assert_eq!(db.store.entries_by_parent(&id(p)).unwrap().len(), 3);

    // A batch where every entry is refused changes nothing and keeps the revision.
    let r = db.apply(Command::EntryCreateBatch {
        entries: vec![entry("e1", "spiffe://example.org/x", p, &["unix:uid:9"])],
    });
    assert_eq!(r.revision, before + 1);
    assert_eq!(db.store.list_entries().unwrap().len(), 3);
}

#[test]
fn t30_join_token_is_consumed_exactly_once() {
    let mut db = Db::new();
    let token = JoinToken {
        token: "s3cret".into(),
        spiffe_id: None,
        expires_at: 2_000,
    };
    db.ok(Command::JoinTokenCreate {
        token: token.clone(),
    });
    assert_eq!(
        db.refused(Command::JoinTokenCreate {
            token: token.clone()
        }),
        CommandError::JoinTokenExists
    );
    assert!(
        !format!("{token:?}").contains("s3cret"),
        "Debug must hide the token"
    );
    let consume = Command::JoinTokenConsume {
        token: "s3cret".into(),
    };
    assert!(
        !format!("{consume:?}").contains("s3cret"),
        "commands must not leak tokens"
    );

    let agent = id("spiffe://example.org/spire/agent/join_token/s3cret");
    let attest = |serial: &str| Command::AgentAttest {
        spiffe_id: agent.clone(),
        attestation_type: "join_token".into(),
        selectors: Selectors::new(),
        serial_number: serial.into(),
        expires_at: 5_000,
        join_token: Some("s3cret".into()),
    };
    // Two racing attestations: the first in log order wins, the second is refused, and the
    // refused one leaves the winner's record alone.
    let first = db.ok(attest("01"));
    assert!(matches!(first, Outcome::Agent { ref agent } if agent.serial_number == "01"));
    assert_eq!(db.refused(attest("02")), CommandError::JoinTokenNotFound);
    assert_eq!(
        db.store.get_agent(&agent).unwrap().unwrap().serial_number,
        "01"
    );
    assert_eq!(
        db.refused(Command::JoinTokenConsume {
            token: "s3cret".into()
        }),
        CommandError::JoinTokenNotFound
    );
}

#[test]
fn t30_expired_tokens_are_refused_and_pruned_by_leader_time() {
    let mut db = Db::new();
    for (t, exp) in [("a", 1_500), ("b", 3_000)] {
        db.ok(Command::JoinTokenCreate {
            token: JoinToken {
                token: t.into(),
                spiffe_id: None,
                expires_at: exp,
            },
        });
    }
    let r = db.apply_at(1_500, Command::JoinTokenConsume { token: "a".into() });
    assert_eq!(r.result, Err(CommandError::JoinTokenExpired));
    let r = db.apply_at(2_000, Command::JoinTokenPrune);
    assert_eq!(r.result, Ok(Outcome::JoinTokensPruned { count: 1 }));
    assert_eq!(db.store.list_join_tokens().unwrap().len(), 1);
    let r = db.apply_at(2_999, Command::JoinTokenConsume { token: "b".into() });
    assert!(matches!(r.result, Ok(Outcome::JoinTokenConsumed { ref token }) if token.token == "b"));
}

#[test]
fn t30_ban_renew_and_evict() {
    let mut db = Db::new();
    let a = id("spiffe://example.org/spire/agent/x509pop/abc");
    let attest = Command::AgentAttest {
        spiffe_id: a.clone(),
        attestation_type: "x509pop".into(),
        selectors: sels(&["x509pop:subject:cn:node1"]),
        serial_number: "aa".into(),
        expires_at: 5_000,
        join_token: None,
    };
    db.ok(attest.clone());
    let renew = |cur: &str, new: &str| Command::AgentRenew {
        spiffe_id: a.clone(),
        current_serial: cur.into(),
        new_serial: new.into(),
        expires_at: 9_000,
    };
    let activate = |serial: &str| Command::AgentActivateSerial {
        spiffe_id: a.clone(),
        serial: serial.into(),
    };
    let serials = |db: &Db| {
        let s = db.store.get_agent(&a).unwrap().unwrap();
        (s.serial_number, s.new_serial_number, s.expires_at)
    };
    // A renewal is pending until used: the current SVID stays valid (a lost reply does not
    // lock the agent out) and may renew again, which replaces the pending one.
    db.ok(renew("aa", "bb"));
    assert_eq!(serials(&db), ("aa".into(), "bb".into(), 5_000));
    db.ok(renew("aa", "cc"));
    assert_eq!(serials(&db), ("aa".into(), "cc".into(), 5_000));
    assert!(matches!(
        db.refused(renew("bb", "dd")),
        CommandError::AgentSerialMismatch { .. }
    ));
    // First use of the pending SVID activates it; the previous one is refused from then on.
    db.ok(activate("cc"));
    assert_eq!(serials(&db), ("cc".into(), String::new(), 9_000));
    assert!(matches!(
        db.refused(renew("aa", "ee")),
        CommandError::AgentSerialMismatch { .. }
    ));
    assert!(matches!(
        db.refused(activate("aa")),
        CommandError::AgentSerialMismatch { .. }
    ));
    // Renewing with the pending SVID activates it in the same step.
    db.ok(renew("cc", "dd"));
    db.ok(renew("dd", "ee"));
    assert_eq!(serials(&db), ("dd".into(), "ee".into(), 9_000));
    // Activating the current serial changes nothing.
    let before = db.store.revision().unwrap();
    let r = db.apply(activate("dd"));
    assert!(r.result.is_ok());
    assert_eq!(r.revision, before);
    db.ok(Command::AgentBan {
        spiffe_id: a.clone(),
    });
    let stored = db.store.get_agent(&a).unwrap().unwrap();
    assert!(stored.banned);
    assert!(stored.serial_number.is_empty());
    assert!(stored.new_serial_number.is_empty());
    assert!(matches!(
        db.refused(renew("dd", "ff")),
        CommandError::AgentBanned { .. }
    ));
    assert!(matches!(
        db.refused(activate("ee")),
        CommandError::AgentBanned { .. }
    ));
    assert!(matches!(
        db.refused(attest.clone()),
        CommandError::AgentBanned { .. }
    ));
    // Evicting deletes the record; the agent may then attest again.
    db.ok(Command::AgentEvict {
        spiffe_id: a.clone(),
    });
    assert_eq!(db.store.get_agent(&a).unwrap(), None);
    db.ok(attest);
    assert!(!db.store.get_agent(&a).unwrap().unwrap().banned);
}

#[test]
fn t40_bundle_sequence_rises_by_one_per_change() {
    let mut db = Db::new();
    let d = td("example.org");
    let c1 = ca_cert("example.org");
    let append = |x509: Vec<Vec<u8>>, jwt: Vec<StoredJwtAuthority>| Command::BundleAppend {
        trust_domain: d.clone(),
        x509_authorities: x509,
        jwt_authorities: jwt,
    };
    let seq = |o: Outcome| match o {
        Outcome::Bundle { bundle } => bundle.sequence_number,
        other => panic!("{other:?}"),
    };
    assert_eq!(seq(db.ok(append(vec![c1.clone()], vec![]))), 1);
    assert_eq!(
        seq(db.ok(append(vec![c1.clone()], vec![]))),
        1,
        "no change, no bump"
    );
    assert_eq!(seq(db.ok(append(vec![], vec![jwt_key("k1")]))), 2);

    // A federated bundle: a peer may not roll its sequence back.
    let fd = td("other.org");
    let mut b = StoredBundle::new(fd.clone());
    b.x509_authorities.push(ca_cert("other.org"));
    b.sequence_number = 7;
    assert_eq!(seq(db.ok(Command::BundleSet { bundle: b.clone() })), 7);
    let mut older = b.clone();
    older.sequence_number = 3;
    older.refresh_hint_secs = Some(60);
    assert!(matches!(
        db.refused(Command::BundleSet { bundle: older }),
        CommandError::BundleSequenceRegressed {
            stored: 7,
            offered: 3,
            ..
        }
    ));
    let mut changed = b.clone();
    changed.sequence_number = 0;
    changed.refresh_hint_secs = Some(60);
    assert_eq!(seq(db.ok(Command::BundleSet { bundle: changed })), 8);

    let mut bad = StoredBundle::new(fd.clone());
    bad.x509_authorities.push(b"not a certificate".to_vec());
    assert!(matches!(
        db.refused(Command::BundleSet { bundle: bad }),
        CommandError::InvalidBundle { .. }
    ));
    assert_eq!(db.store.list_bundles().unwrap().len(), 2);
    let stored = db.store.get_bundle(&fd).unwrap().unwrap();
    let spiffe_bundle = stored.to_bundle().unwrap();
    assert_eq!(spiffe_bundle.sequence_number(), 8);
    assert_eq!(StoredBundle::from_bundle(&spiffe_bundle), stored);
}

#[test]
fn t40_federation_relationships() {
    let mut db = Db::new();
    let rel = FederationRelationship {
        trust_domain: td("other.org"),
        bundle_endpoint_url: "https://other.org/bundle".into(),
        profile: BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: id("spiffe://other.org/bundle-server"),
        },
    };
    db.ok(Command::FederationCreate {
        relationship: rel.clone(),
    });
    assert!(matches!(
        db.refused(Command::FederationCreate {
            relationship: rel.clone()
        }),
        CommandError::FederationExists { .. }
    ));
    let mut web = rel.clone();
    web.profile = BundleEndpointProfile::HttpsWeb;
    db.ok(Command::FederationUpdate {
        relationship: web.clone(),
    });
    assert_eq!(db.store.list_federations().unwrap(), vec![web]);
    db.ok(Command::FederationDelete {
        trust_domain: td("other.org"),
    });
    assert!(matches!(
        db.refused(Command::FederationDelete {
            trust_domain: td("other.org")
        }),
        CommandError::FederationNotFound { .. }
    ));
}

#[test]
fn t50_ca_journal_transitions_keep_one_active_authority_per_node() {
    let mut db = Db::new();
    let d = td("example.org");
    let auth = |aid: &str, node: u64, cert: Vec<u8>| CaAuthority {
        authority_id: aid.into(),
        node_id: node,
        slot: "A".into(),
        public: AuthorityPublic::X509 { cert_der: cert },
        not_after: 10_000,
        status: AuthorityStatus::Active, // apply overrides it with Prepared
        upstream_authority_id: None,
        updated_at: 0,
    };
    let (c1, c2) = (ca_cert("example.org"), ca_cert("example.org"));
    let prep = |a: CaAuthority| Command::CaPrepare {
        trust_domain: d.clone(),
        authority: a,
    };
    db.ok(prep(auth("a1", 1, c1.clone())));
    let status = |db: &Db, aid: &str| db.store.get_authority(aid).unwrap().unwrap().status;
    assert_eq!(status(&db, "a1"), AuthorityStatus::Prepared);
    let bundle = db.store.get_bundle(&d).unwrap().unwrap();
    assert_eq!(
        bundle.x509_authorities,
        vec![c1.clone()],
        "prepared key is in the bundle"
    );
    assert_eq!(bundle.sequence_number, 1);

    assert!(matches!(
        db.refused(Command::CaTaint {
            authority_id: "a1".into()
        }),
        CommandError::AuthorityWrongStatus { .. }
    ));
    db.ok(Command::CaActivate {
        authority_id: "a1".into(),
    });
    db.ok(prep(auth("a2", 1, c2.clone())));
    db.ok(Command::CaActivate {
        authority_id: "a2".into(),
    });
    assert_eq!(status(&db, "a1"), AuthorityStatus::Old);
    assert_eq!(status(&db, "a2"), AuthorityStatus::Active);
    let actives = db
        .store
        .list_authorities()
        .unwrap()
        .into_iter()
        .filter(|a| a.node_id == 1 && a.status == AuthorityStatus::Active)
        .count();
    assert_eq!(actives, 1);

    assert!(matches!(
        db.refused(Command::CaRevoke {
            trust_domain: d.clone(),
            authority_id: "a1".into()
        }),
        CommandError::AuthorityWrongStatus { .. }
    ));
    db.ok(Command::CaTaint {
        authority_id: "a1".into(),
    });
    db.ok(Command::CaRevoke {
        trust_domain: d.clone(),
        authority_id: "a1".into(),
    });
    assert_eq!(status(&db, "a1"), AuthorityStatus::Revoked);
    let bundle = db.store.get_bundle(&d).unwrap().unwrap();
    assert_eq!(bundle.x509_authorities, vec![c2]);
    assert_eq!(bundle.sequence_number, 3);
}

#[test]
fn t60_changes_carry_the_revision_and_never_the_token() {
    let mut db = Db::new();
    db.index += 1;
    let applied = db
        .store
        .apply(
            db.index,
            Some(&Proposal::at(
                1,
                Command::JoinTokenCreate {
                    token: JoinToken {
                        token: "tok".into(),
                        spiffe_id: None,
                        expires_at: 100,
                    },
                },
            )),
            b"x",
        )
        .unwrap();
    assert_eq!(applied.changes.len(), 1);
    assert_eq!(applied.changes[0].revision, 1);
    assert_eq!(applied.changes[0].log_index, 1);
    assert_eq!(applied.changes[0].change, Change::JoinTokensChanged);
    // Raft-internal entries change nothing but record the applied state.
    let applied = db.store.apply(2, None, b"y").unwrap();
    assert!(applied.changes.is_empty());
    assert_eq!(applied.response.revision, 1);
    assert_eq!(db.store.applied_state().unwrap(), Some(b"y".to_vec()));
}

#[test]
fn t70_snapshot_export_import_reproduces_state() {
    let mut a = Db::new();
    a.ok(Command::EntryCreate {
        entry: entry(
            "e1",
            "spiffe://example.org/web",
            "spiffe://example.org/agent",
            &["unix:uid:1"],
        ),
    });
    a.ok(Command::BundleAppend {
        trust_domain: td("example.org"),
        x509_authorities: vec![ca_cert("example.org")],
        jwt_authorities: vec![],
    });
    let (data, applied) = a.store.export_state().unwrap();
    assert_eq!(applied, Some(2u64.to_be_bytes().to_vec()));

    let mut b = Db::new();
    b.ok(Command::EntryCreate {
        entry: entry(
            "stale",
            "spiffe://example.org/old",
            "spiffe://example.org/agent",
            &["unix:uid:9"],
        ),
    });
    // A corrupt snapshot changes nothing.
    assert!(matches!(
        b.store.import_state(&data[..data.len() - 3]),
        Err(StorageError::BadSnapshot(_))
    ));
    assert!(b.store.get_entry("stale").unwrap().is_some());

    assert_eq!(b.store.import_state(&data).unwrap(), applied);
    assert_eq!(b.store.get_entry("stale").unwrap(), None);
    assert!(b
        .store
        .entries_by_selector(&Selector::parse("unix:uid:9").unwrap())
        .unwrap()
        .is_empty());
    assert_eq!(
        b.store.list_entries().unwrap(),
        a.store.list_entries().unwrap()
    );
    assert_eq!(
        b.store.list_bundles().unwrap(),
        a.store.list_bundles().unwrap()
    );
    assert_eq!(b.store.revision().unwrap(), a.store.revision().unwrap());
    assert_eq!(b.store.export_state().unwrap().0, data);
}

#[test]
fn t71_snapshot_file_roundtrip_private_and_checked() {
    let db = Db::new();
    assert_eq!(db.store.snapshot_get().unwrap(), None);
    db.store
        .snapshot_put(b"{\"meta\":1}", b"state bytes")
        .unwrap();
    assert_eq!(
        db.store.snapshot_get().unwrap(),
        Some(SnapshotFile {
            meta: b"{\"meta\":1}".to_vec(),
            data: b"state bytes".to_vec()
        })
    );
    assert_eq!(
        db.store.snapshot_meta().unwrap(),
        Some(b"{\"meta\":1}".to_vec())
    );
    let path = db.store.snapshot_path();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the state holds join tokens");
    // A newer snapshot replaces the old one whole.
    db.store.snapshot_put(b"m2", b"").unwrap();
    assert_eq!(
        db.store.snapshot_get().unwrap(),
        Some(SnapshotFile {
            meta: b"m2".to_vec(),
            data: Vec::new()
        })
    );
    // A damaged file is an error, never a silently empty state.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        db.store.snapshot_get(),
        Err(StorageError::BadSnapshot(_))
    ));
    assert!(matches!(
        db.store.snapshot_meta(),
        Err(StorageError::BadSnapshot(_))
    ));
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(
        db.store.snapshot_get(),
        Err(StorageError::BadSnapshot(_))
    ));
    std::fs::write(&path, b"garbage and then some more").unwrap();
    assert!(matches!(
        db.store.snapshot_get(),
        Err(StorageError::BadSnapshot(_))
    ));
}
