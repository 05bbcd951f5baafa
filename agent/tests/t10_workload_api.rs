//! The Workload API over a real Unix socket, driven by a tonic client: the security header, the
//! status codes and messages of the standard, stream pushes on cache changes, bundles, JWT-SVIDs.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::*;
use plinth_api::convert::{x509_bundles, ReceivedX509Svid};
use plinth_api::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use plinth_spiffe::x509::verify_svid;
use plinth_spiffe::{BundleSet, JwtSvidParams, Selectors, Signer};
use tonic::Code;

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    let e = r.expect_err("call should fail");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(msg), "{e:?}");
}

#[tokio::test]
async fn t10_calls_without_the_security_header_are_invalid_argument() {
    let h = Harness::start().await;
    h.add(entry("e1", "spiffe://example.org/web", &[&my_selector()]));
    let mut c = h.bare_client();
    const MSG: &str = "security header missing from request";
    assert_status(
        c.fetch_x509svid(X509svidRequest {}).await,
        Code::InvalidArgument,
        MSG,
    );
    assert_status(
        c.fetch_x509_bundles(X509BundlesRequest {}).await,
        Code::InvalidArgument,
        MSG,
    );
    assert_status(
        c.fetch_jwt_bundles(JwtBundlesRequest {}).await,
        Code::InvalidArgument,
        MSG,
    );
    assert_status(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        MSG,
    );
    assert_status(
        c.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x.y.z".into(),
        })
        .await,
        Code::InvalidArgument,
        MSG,
    );
    // A header with another value is no header.
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    assert_status(c.fetch_x509svid(req).await, Code::InvalidArgument, MSG);
}

#[tokio::test]
async fn t10_socket_is_world_connectable_in_a_directory_only_the_owner_writes() {
    let h = Harness::start().await;
    let dir_mode = std::fs::metadata(h.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o755);
    let meta = std::fs::symlink_metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);

    // A directory others can write is refused (they could swap the socket), and so is a
    // non-socket file at the socket path.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(plinth_agent::endpoint::bind(&open.path().join("api.sock")).is_err());
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("api.sock"), b"data").unwrap();
    assert!(plinth_agent::endpoint::bind(&d.path().join("api.sock")).is_err());
    assert_eq!(std::fs::read(d.path().join("api.sock")).unwrap(), b"data");
}

#[tokio::test]
async fn t10_no_matching_entry_is_permission_denied() {
    let h = Harness::start().await;
    h.add(entry(
        "e1",
        "spiffe://example.org/other",
        &["unix:uid:4242"],
    ));
    let mut c = h.client();
    const MSG: &str = "no identity issued";
    assert_status(
        c.fetch_x509svid(X509svidRequest {}).await,
        Code::PermissionDenied,
        MSG,
    );
    assert_status(
        c.fetch_x509_bundles(X509BundlesRequest {}).await,
        Code::PermissionDenied,
        MSG,
    );
    assert_status(
        c.fetch_jwt_bundles(JwtBundlesRequest {}).await,
        Code::PermissionDenied,
        MSG,
    );
    assert_status(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await,
        Code::PermissionDenied,
        MSG,
    );
}

#[tokio::test]
async fn t10_fetch_x509_svid_serves_matching_entries_with_bundles_and_hints() {
    let h = Harness::start().await;
    let mut web = entry("e1", "spiffe://example.org/web", &[&my_selector()]);
    web.hint = "external".into();
    web.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
    h.add(web);
    // Same hint as e1: dropped, since hints are unique per response.
    let mut dup = entry("e2", "spiffe://example.org/dup", &[&my_selector()]);
    dup.hint = "external".into();
    h.add(dup);
    h.add(entry(
        "e3",
        "spiffe://example.org/db",
        &[&my_selector(), "unix:gid:0"],
    ));
    h.add(entry("e4", "spiffe://example.org/nope", &["unix:uid:4242"]));

    let mut stream = h
        .client()
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let resp = next(&mut stream).await.unwrap().unwrap();
    let ids: Vec<&str> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/web", "spiffe://example.org/db"],
        "entries in ID order; e2 (duplicate hint) and e4 (other uid) left out"
    );
    assert_eq!(resp.svids[0].hint, "external");
    assert_eq!(resp.svids[1].hint, "");

    let mut own = BundleSet::new();
    own.insert(h.domain.bundle.clone());
    for m in &resp.svids {
        let svid = ReceivedX509Svid::try_from(m).unwrap();
        assert_eq!(svid.bundle, vec![h.domain.ca.cert_der().to_vec()]);
        let verified = verify_svid(&svid.chain, &own, now()).unwrap();
        assert_eq!(verified.spiffe_id, svid.spiffe_id);
        // The key is the one the certificate was issued for.
        assert_eq!(
            plinth_spiffe::x509::cert_public_key_spki(&svid.chain[0]).unwrap(),
            svid.private_key.public_key_spki()
        );
    }
    // Federated bundles: only those an identity federates with.
    let fed = x509_bundles(&resp.federated_bundles).unwrap();
    assert_eq!(fed.len(), 1);
    let partner = fed
        .get(&plinth_spiffe::TrustDomain::new(FED_TD).unwrap())
        .unwrap();
    assert_eq!(
        partner.x509_authorities(),
        &[h.partner.ca.cert_der().to_vec()]
    );
}

#[tokio::test]
async fn t20_stream_pushes_changes_and_ends_when_the_last_entry_goes() {
    let h = Harness::start().await;
    h.add(entry("e1", "spiffe://example.org/a", &[&my_selector()]));
    h.add(entry("e2", "spiffe://example.org/b", &[&my_selector()]));
    let mut stream = h
        .client()
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 2);

    // e1's selectors change so that they no longer match this workload: pushed without asking.
    let mut moved = entry("e1", "spiffe://example.org/a", &["unix:uid:4242"]);
    moved.selectors = Selectors::parse_all(&["unix:uid:4242"]).unwrap();
    h.cache.update_entry(moved).unwrap();
    let second = next(&mut stream).await.unwrap().unwrap();
    let ids: Vec<&str> = second.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/b"]);

    // A change that does not alter what this caller receives sends nothing; the next message is
    // the one after the following real change (e2 rotated to a new SVID).
    h.add(entry("e9", "spiffe://example.org/z", &["unix:uid:4242"]));
    let rotated = h.add(entry("e2", "spiffe://example.org/b", &[&my_selector()]));
    let third = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(third.svids.len(), 1);
    assert_eq!(third.svids[0].x509_svid, rotated.svid.chain_der_concat());
    assert_ne!(third.svids[0].x509_svid, second.svids[0].x509_svid);

    // The last matching entry is deleted: the stream ends with PermissionDenied, and so does a
    // new call.
    assert!(h.cache.remove_entry("e2"));
    let end = next(&mut stream).await;
    assert_status(end, Code::PermissionDenied, "no identity issued");
    assert_status(
        h.client().fetch_x509svid(X509svidRequest {}).await,
        Code::PermissionDenied,
        "no identity issued",
    );
}

#[tokio::test]
async fn t20_bundle_streams_carry_own_and_federated_bundles_and_push_updates() {
    let h = Harness::start().await;
    let mut e = entry("e1", "spiffe://example.org/a", &[&my_selector()]);
    e.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
    h.add(e);
    let mut c = h.client();
    let mut x509 = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut jwt = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let xb = next(&mut x509).await.unwrap().unwrap();
    let set = x509_bundles(&xb.bundles).unwrap();
    assert_eq!(set.len(), 2);
    let jb = next(&mut jwt).await.unwrap().unwrap();
    let jset = BundleSet::try_from(&jb).unwrap();
    assert_eq!(jset.len(), 2);
    let own = jset
        .get(&plinth_spiffe::TrustDomain::new(TD).unwrap())
        .unwrap();
    assert_eq!(own.jwt_authorities()[0].key_id, JWT_KID);
    assert!(
        own.x509_authorities().is_empty(),
        "JWT bundles carry only jwt-svid keys"
    );

    // A new CA is added to the own bundle: both streams push it.
    let extra = Domain::new(TD, "jwt-key-2");
    let mut bundle = h.domain.bundle.clone();
    bundle
        .add_x509_authority(extra.ca.cert_der().to_vec())
        .unwrap();
    bundle
        .add_jwt_authority(extra.bundle.jwt_authorities()[0].clone())
        .unwrap();
    bundle.set_sequence_number(2);
    h.cache.set_bundle(bundle).unwrap();
    let xb2 = next(&mut x509).await.unwrap().unwrap();
    let own2 = x509_bundles(&xb2.bundles).unwrap();
    assert_eq!(
        own2.get(&plinth_spiffe::TrustDomain::new(TD).unwrap())
            .unwrap()
            .x509_authorities()
            .len(),
        2
    );
    let jb2 = next(&mut jwt).await.unwrap().unwrap();
    let jset2 = BundleSet::try_from(&jb2).unwrap();
    let own_jwt = jset2
        .get(&plinth_spiffe::TrustDomain::new(TD).unwrap())
        .unwrap();
    assert_eq!(own_jwt.jwt_authorities().len(), 2);
    assert_eq!(own_jwt.sequence_number(), 2);
}

#[tokio::test]
async fn t30_jwt_svids_fetch_select_validate() {
    let h = Harness::start().await;
    let mut a = entry("e1", "spiffe://example.org/a", &[&my_selector()]);
    a.hint = "ha".into();
    h.add(a);
    h.add(entry("e2", "spiffe://example.org/b", &[&my_selector()]));
    let mut c = h.client();

    assert_status(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "audience",
    );
    assert_status(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: "spiffe://example.org/../a".into(),
        })
        .await,
        Code::InvalidArgument,
        "spiffe_id",
    );
    assert_status(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: "spiffe://example.org/c".into(),
        })
        .await,
        Code::PermissionDenied,
        "no identity issued",
    );

    let all = c
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["svc-1".into(), "svc-2".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.svids.len(), 2);
    assert_eq!(all.svids[0].hint, "ha");
    let one = c
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["svc-2".into(), "svc-1".into()],
            spiffe_id: "spiffe://example.org/b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.svids.len(), 1);
    assert_eq!(one.svids[0].spiffe_id, "spiffe://example.org/b");
    assert_eq!(
        one.svids[0].svid, all.svids[1].svid,
        "cached by SPIFFE ID and audience set"
    );

    let valid = c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc-1".into(),
            svid: one.svids[0].svid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(valid.spiffe_id, "spiffe://example.org/b");
    let claims = valid.claims.unwrap();
    use prost_types::value::Kind;
    assert_eq!(
        claims.fields["sub"].kind,
        Some(Kind::StringValue("spiffe://example.org/b".into()))
    );
    assert!(claims.fields.contains_key("exp"));
    assert!(claims.fields.contains_key("aud"));

    assert_status(
        c.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "other".into(),
            svid: one.svids[0].svid.clone(),
        })
        .await,
        Code::InvalidArgument,
        "audience",
    );
    assert_status(
        c.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: String::new(),
            svid: one.svids[0].svid.clone(),
        })
        .await,
        Code::InvalidArgument,
        "audience must be specified",
    );
    assert_status(
        c.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc-1".into(),
            svid: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "svid must be specified",
    );

    // A token of the federated trust domain validates against its federated bundle; one signed
    // by a key no bundle holds does not.
    let aud = vec!["svc-1".to_string()];
    let fed_id = id("spiffe://partner.test/client");
    let (fed_token, _) = plinth_spiffe::jwt::mint(
        h.partner.jwt_key.as_ref(),
        &JwtSvidParams {
            subject: &fed_id,
            audience: &aud,
            ttl: std::time::Duration::from_secs(60),
            key_id: FED_JWT_KID,
            alg: None,
        },
        now(),
    )
    .unwrap();
    let v = c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc-1".into(),
            svid: fed_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, "spiffe://partner.test/client");
    let stranger = Domain::new(TD, JWT_KID);
    let (forged, _) = plinth_spiffe::jwt::mint(
        stranger.jwt_key.as_ref(),
        &JwtSvidParams {
            subject: &id("spiffe://example.org/a"),
            audience: &aud,
            ttl: std::time::Duration::from_secs(60),
            key_id: JWT_KID,
            alg: None,
        },
        now(),
    )
    .unwrap();
    let e = c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "svc-1".into(),
            svid: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Signing key check uses the bundle: the stranger's key is not the published one.
    assert!(h.domain.jwt_key.public_key_spki() != stranger.jwt_key.public_key_spki());
}
