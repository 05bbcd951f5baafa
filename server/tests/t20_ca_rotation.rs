#![allow(clippy::unwrap_used)]
//! CA manager: first boot, SPIRE's rotation schedule on an injected clock, restart, crash between
//! prepare and activate, and forced rotation (prepare, activate, taint, revoke).

use std::sync::Arc;
use std::time::Duration;

use plinth_server::ca::{activate_at, prepare_at, CaConfig, CaManager};
use plinth_server::clock::{Clock, ManualClock};
use plinth_server::state::{LocalState, Replicated};
use plinth_spiffe::x509::verify_svid;
use plinth_spiffe::{
    jwt, Bundle, JwtAuthority, KeyType, PrivateKey, Signer, SpiffeId, TrustDomain,
};
use plinth_storage::{AuthorityKind, AuthorityStatus, Store};
use plinth_upstream::{DiskKeyManager, KeyManager};
use time::OffsetDateTime;

const DAY: u64 = 86400;

fn cfg() -> CaConfig {
    CaConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        ca_ttl: Duration::from_secs(DAY),
        ca_key_type: KeyType::EcP256,
        jwt_key_type: KeyType::EcP256,
        ca_organization: "SPIFFE".into(),
        ca_country: "US".into(),
        ca_common_name: None,
        jwt_issuer: None,
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    state: Arc<LocalState>,
    keys: Arc<DiskKeyManager>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap());
    let store = Store::open(dir.path().join("data")).unwrap();
    let state = Arc::new(LocalState::new(1, store, Arc::new(clock.clone())));
    let keys = Arc::new(DiskKeyManager::open(dir.path().join("keys")).unwrap());
    Rig {
        _dir: dir,
        clock,
        state,
        keys,
    }
}

fn manager(r: &Rig) -> CaManager<LocalState> {
    CaManager::new(
        cfg(),
        r.state.clone(),
        r.keys.clone(),
        None,
        Arc::new(r.clock.clone()),
    )
}

fn bundle(r: &Rig) -> Bundle {
    let stored = r
        .state
        .store()
        .get_bundle(&TrustDomain::new("example.org").unwrap())
        .unwrap()
        .unwrap();
    let mut b = Bundle::new(stored.trust_domain.clone());
    for c in stored.x509_authorities {
        b.add_x509_authority(c).unwrap();
    }
    for j in stored.jwt_authorities {
        b.add_jwt_authority(JwtAuthority {
            key_id: j.key_id,
            public_key_spki: j.public_key_spki,
        })
        .unwrap();
    }
    b.set_sequence_number(stored.sequence_number);
    b
}

fn statuses(m: &CaManager<LocalState>, kind: AuthorityKind) -> Vec<AuthorityStatus> {
    let mut v: Vec<_> = m
        .authorities()
        .unwrap()
        .into_iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.status)
        .collect();
    v.sort_by_key(|s| format!("{s:?}"));
    v
}

fn sign(m: &CaManager<LocalState>) -> Vec<Vec<u8>> {
    let k = PrivateKey::generate(KeyType::EcP256).unwrap();
    m.sign_x509_svid(
        &SpiffeId::new("spiffe://example.org/w").unwrap(),
        k.public_key_spki(),
        Duration::from_secs(3600),
        &[],
    )
    .unwrap()
    .chain
}

#[test]
fn t20_schedule_matches_spire() {
    let nb = OffsetDateTime::from_unix_timestamp(0).unwrap();
    let na = nb + time::Duration::days(1);
    assert_eq!(prepare_at(nb, na), nb + time::Duration::hours(12));
    assert_eq!(activate_at(nb, na), na - time::Duration::hours(4));
    // Long-lived CAs: 30 and 7 day caps.
    let na = nb + time::Duration::days(365);
    assert_eq!(prepare_at(nb, na), na - time::Duration::days(30));
    assert_eq!(activate_at(nb, na), na - time::Duration::days(7));
}

#[tokio::test]
async fn t21_first_boot_publishes_before_signing() {
    let r = rig();
    let m = manager(&r);
    assert!(!m.is_ready());
    m.init().await.unwrap();
    assert!(m.is_ready());
    let b = bundle(&r);
    assert_eq!(b.x509_authorities().len(), 1);
    assert_eq!(b.jwt_authorities().len(), 1);
    assert!(b.sequence_number() >= 2, "each prepare bumped the sequence");
    let chain = sign(&m);
    verify_svid(&chain, &b, r.clock.now()).unwrap();
    let aud = vec!["db".to_string()];
    let (token, _) = m
        .mint_jwt_svid(
            &SpiffeId::new("spiffe://example.org/w").unwrap(),
            &aud,
            Duration::from_secs(300),
        )
        .unwrap();
    jwt::validate(&token, &b, "db", r.clock.now()).unwrap();
    assert_eq!(
        statuses(&m, AuthorityKind::X509),
        vec![AuthorityStatus::Active]
    );
}

#[tokio::test]
async fn t22_rotation_follows_the_clock() {
    let r = rig();
    let m = manager(&r);
    m.init().await.unwrap();
    let first = sign(&m);
    // Before half-life nothing happens.
    r.clock.advance(time::Duration::hours(11));
    m.rotate().await.unwrap();
    assert_eq!(bundle(&r).x509_authorities().len(), 1);
    // Half-life: a successor is prepared and published, but not used yet.
    r.clock.advance(time::Duration::hours(2));
    m.rotate().await.unwrap();
    let b = bundle(&r);
    assert_eq!(
        b.x509_authorities().len(),
        2,
        "prepared CA is in the bundle"
    );
    assert_eq!(b.jwt_authorities().len(), 2);
    let mut st = statuses(&m, AuthorityKind::X509);
    st.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(st, vec![AuthorityStatus::Active, AuthorityStatus::Prepared]);
    let still_old = sign(&m);
    assert_eq!(
        plinth_spiffe::x509::verify_svid(&still_old, &b, r.clock.now())
            .unwrap()
            .authority_index,
        0,
        "the active CA still signs until activation"
    );
    // Five-sixths: the successor becomes active; the old one stays in the bundle.
    r.clock.advance(time::Duration::hours(7));
    m.rotate().await.unwrap();
    let b = bundle(&r);
    let new = sign(&m);
    assert_eq!(
        verify_svid(&new, &b, r.clock.now())
            .unwrap()
            .authority_index,
        1
    );
    assert!(verify_svid(&first, &b, r.clock.now() - time::Duration::hours(19)).is_ok());
    let st = statuses(&m, AuthorityKind::X509);
    assert!(
        st.contains(&AuthorityStatus::Active) && st.contains(&AuthorityStatus::Old),
        "{st:?}"
    );
}

#[tokio::test]
async fn t23_restart_reloads_instead_of_regenerating() {
    let r = rig();
    let m = manager(&r);
    m.init().await.unwrap();
    let seq = bundle(&r).sequence_number();
    let ca1 = m.active_x509().unwrap().cert_der().to_vec();
    drop(m);
    let m2 = manager(&r);
    m2.init().await.unwrap();
    assert_eq!(m2.active_x509().unwrap().cert_der(), ca1.as_slice());
    assert_eq!(
        bundle(&r).sequence_number(),
        seq,
        "no new authority on restart"
    );
}

#[tokio::test]
async fn t24_crash_between_prepare_and_activate() {
    let r = rig();
    let m = manager(&r);
    m.init().await.unwrap();
    r.clock.advance(time::Duration::hours(13));
    m.rotate().await.unwrap(); // prepared, not yet active
    let prepared: Vec<_> = m
        .authorities()
        .unwrap()
        .into_iter()
        .filter(|a| a.status == AuthorityStatus::Prepared && a.kind == AuthorityKind::X509)
        .collect();
    assert_eq!(prepared.len(), 1);
    drop(m); // "kill -9": nothing else happens
    let m2 = manager(&r);
    m2.init().await.unwrap();
    assert_eq!(
        statuses(&m2, AuthorityKind::X509),
        vec![AuthorityStatus::Active, AuthorityStatus::Prepared],
        "exactly one active; the prepared one is kept, not duplicated"
    );
    assert_eq!(
        bundle(&r).x509_authorities().len(),
        2,
        "bundle already holds the new key"
    );
    r.clock.advance(time::Duration::hours(7));
    m2.rotate().await.unwrap();
    let chain = sign(&m2);
    let b = bundle(&r);
    assert_eq!(
        verify_svid(&chain, &b, r.clock.now())
            .unwrap()
            .authority_index,
        1
    );
}

#[tokio::test]
async fn t25_forced_rotation_taint_and_revoke() {
    let r = rig();
    let m = manager(&r);
    m.init().await.unwrap();
    let old_id = m
        .authorities()
        .unwrap()
        .into_iter()
        .find(|a| a.kind == AuthorityKind::X509)
        .unwrap()
        .authority_id;
    // Revoking an active authority is refused: it must be rotated out and tainted first.
    assert!(m.revoke(&old_id).await.is_err());
    assert!(m.taint(&old_id).await.is_err());
    m.prepare(AuthorityKind::X509).await.unwrap();
    m.activate(AuthorityKind::X509).await.unwrap();
    m.taint(&old_id).await.unwrap();
    assert_eq!(
        bundle(&r).x509_authorities().len(),
        2,
        "tainted stays in the bundle"
    );
    let before = bundle(&r).sequence_number();
    m.revoke(&old_id).await.unwrap();
    let b = bundle(&r);
    assert_eq!(b.x509_authorities().len(), 1, "revoked leaves the bundle");
    assert!(b.sequence_number() > before);
    assert!(m.taint("nonexistent").await.is_err());
    // Activate with nothing prepared is a clear error.
    let e = m.activate(AuthorityKind::X509).await.unwrap_err();
    assert!(e.to_string().contains("no prepared x509 authority"), "{e}");
}

#[tokio::test]
async fn t26_lost_keys_are_replaced_not_used() {
    // A memory key manager loses its keys on restart; the journal still names the old authority.
    let r = rig();
    let mem: Arc<dyn KeyManager> = Arc::new(plinth_upstream::MemoryKeyManager::new());
    let m = CaManager::new(cfg(), r.state.clone(), mem, None, Arc::new(r.clock.clone()));
    m.init().await.unwrap();
    let first = m.active_x509().unwrap().cert_der().to_vec();
    let mem2: Arc<dyn KeyManager> = Arc::new(plinth_upstream::MemoryKeyManager::new());
    let m2 = CaManager::new(
        cfg(),
        r.state.clone(),
        mem2,
        None,
        Arc::new(r.clock.clone()),
    );
    m2.init().await.unwrap();
    assert_ne!(m2.active_x509().unwrap().cert_der(), first.as_slice());
    let chain = sign(&m2);
    verify_svid(&chain, &bundle(&r), r.clock.now()).unwrap();
}
