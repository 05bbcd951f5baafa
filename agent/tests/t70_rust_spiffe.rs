//! Interoperability with the crates.io `spiffe` crate (rust-spiffe): X509Source, JwtSource and
//! WorkloadApiClient against the agent's socket. That client is strict: it rejects empty SVID
//! lists and empty bundle maps, so this also checks that nothing the agent sends is empty.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use spiffe::{JwtSource, TrustDomain, WorkloadApiClient, X509Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_rust_spiffe_sources_receive_svids_bundles_and_updates() {
    let h = Harness::start().await;
    let mut web = entry("e1", "spiffe://example.org/web", &[&my_selector()]);
    web.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
    h.add(web);
    let endpoint = format!("unix://{}", h.socket.display());
    let own = TrustDomain::new(TD).unwrap();
    let partner = TrustDomain::new(FED_TD).unwrap();

    let x509 = tokio::time::timeout(
        Duration::from_secs(20),
        X509Source::builder().endpoint(&endpoint).build(),
    )
    .await
    .unwrap()
    .unwrap();
    let svid = x509.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let bundles = x509.bundle_set().unwrap();
    assert!(bundles.get(&own).is_some());
    assert!(bundles.get(&partner).is_some());

    // A rotated SVID is pushed to the source.
    let mut updates = x509.updated();
    let rotated = h.add({
        let mut e = entry("e1", "spiffe://example.org/web", &[&my_selector()]);
        e.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
        e
    });
    // Updates the source saw before the rotation may still be pending; wait for the rotated one.
    tokio::time::timeout(Duration::from_secs(20), async {
        while x509.svid().unwrap().leaf().as_ref() != rotated.svid.leaf() {
            updates.changed().await.unwrap();
        }
    })
    .await
    .expect("the rotated SVID reaches the source");
    x509.shutdown().await;

    let jwt = tokio::time::timeout(
        Duration::from_secs(20),
        JwtSource::builder().endpoint(&endpoint).build(),
    )
    .await
    .unwrap()
    .unwrap();
    let token = jwt.get_jwt_svid(["svc-a"]).await.unwrap();
    assert_eq!(token.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(token.audience(), ["svc-a"]);
    let jwt_bundles = jwt.bundle_set().unwrap();
    assert!(jwt_bundles.get(&own).is_some());
    assert!(jwt_bundles.get(&partner).is_some());
    jwt.shutdown().await;

    let client = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let validated = client
        .validate_jwt_token(["svc-a"], token.token())
        .await
        .unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    assert!(client
        .validate_jwt_token(["svc-b"], token.token())
        .await
        .is_err());
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
}
