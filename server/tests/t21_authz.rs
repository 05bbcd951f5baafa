#![allow(clippy::unwrap_used)]
//! Which entries an agent is authorized for: its own children, node aliases whose selectors it
//! has, and, transitively, entries parented to those; never anything else; expired entries never.

use std::sync::Arc;

use plinth_server::authz::{authorized_entries, server_id};
use plinth_server::clock::{Clock, ManualClock};
use plinth_server::state::{LocalState, Replicated};
use plinth_spiffe::{Selectors, SpiffeId, TrustDomain};
use plinth_storage::{Command, RegistrationEntry, Store};

fn entry(
    id: &str,
    spiffe_id: &str,
    parent: &str,
    sel: &[&str],
    expires_at: Option<i64>,
) -> RegistrationEntry {
    RegistrationEntry {
        expires_at,
        ..RegistrationEntry::new(
            id,
            SpiffeId::new(spiffe_id).unwrap(),
            SpiffeId::new(parent).unwrap(),
            Selectors::parse_all(sel).unwrap(),
        )
    }
}

#[tokio::test]
async fn t21_authorized_entries() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap());
    let state = LocalState::new(1, Store::open(dir.path()).unwrap(), Arc::new(clock.clone()));
    let td = TrustDomain::new("example.org").unwrap();
    let server = server_id(&td).to_string();
    let agent = "spiffe://example.org/spire/agent/x509pop/abc";
    let now = clock.now().unix_timestamp();
    for e in [
        entry(
            "alias",
            "spiffe://example.org/nodes/web",
            &server,
            &["x509pop:subject:cn:web1"],
            None,
        ),
        entry(
            "alias-other",
            "spiffe://example.org/nodes/db",
            &server,
            &["x509pop:subject:cn:db1"],
            None,
        ),
        entry(
            "via-alias",
            "spiffe://example.org/web",
            "spiffe://example.org/nodes/web",
            &["unix:uid:1"],
            None,
        ),
        entry(
            "nested",
            "spiffe://example.org/web/child",
            "spiffe://example.org/web",
            &["unix:uid:2"],
            None,
        ),
        entry(
            "direct",
            "spiffe://example.org/direct",
            agent,
            &["unix:uid:3"],
            None,
        ),
        entry(
            "expired",
            "spiffe://example.org/old",
            agent,
            &["unix:uid:4"],
            Some(now - 1),
        ),
        entry(
            "other-agent",
            "spiffe://example.org/theirs",
            "spiffe://example.org/spire/agent/x509pop/zzz",
            &["unix:uid:5"],
            None,
        ),
        entry(
            "db-child",
            "spiffe://example.org/db",
            "spiffe://example.org/nodes/db",
            &["unix:uid:6"],
            None,
        ),
    ] {
        state
            .propose(Command::EntryCreate { entry: e })
            .await
            .unwrap();
    }
    let selectors =
        Selectors::parse_all(&["x509pop:subject:cn:web1", "x509pop:ca:fingerprint:ff"]).unwrap();
    let got = authorized_entries(
        state.store(),
        &td,
        &SpiffeId::new(agent).unwrap(),
        &selectors,
        now,
    )
    .unwrap();
    let ids: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(ids, vec!["direct", "nested", "via-alias"]);
    // Without the alias selector only the direct child remains.
    let got = authorized_entries(
        state.store(),
        &td,
        &SpiffeId::new(agent).unwrap(),
        &Selectors::new(),
        now,
    )
    .unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), vec!["direct"]);
}
