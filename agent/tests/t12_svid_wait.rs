//! Issue 5: a caller whose matching entries have no cached X509-SVID (not prefetched, or
//! evicted) waits while the agent gets them, then gets the full set; a bounded wait ends with
//! what there is, or `Unavailable` when there is nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{entry, my_selector, next, Harness};
use plinth_agent::cache::CachedSvid;
use plinth_api::workload::X509svidRequest;
use tonic::Code;

const HANG_GUARD: Duration = Duration::from_secs(20);

fn put_entry(h: &Harness, id: &str, spiffe_id: &str) {
    let e = entry(id, spiffe_id, &[&my_selector()]);
    h.cache.modify(|s| s.put_entry(Arc::new(e))).unwrap();
}

fn put_svid(h: &Harness, id: &str) {
    let spiffe_id = h.cache.state().entry(id).unwrap().spiffe_id.clone();
    let (svid, private_key) = h.domain.svid(&spiffe_id);
    h.cache
        .modify(|s| s.put_svid(id, CachedSvid { svid, private_key }))
        .unwrap();
}

#[tokio::test]
async fn t12_a_caller_waits_for_missing_svids_then_gets_all_of_them() {
    let h = Harness::start_with_svid_wait(HANG_GUARD).await;
    put_entry(&h, "e1", "spiffe://example.org/one");
    put_entry(&h, "e2", "spiffe://example.org/two");
    put_svid(&h, "e1");

    let mut client = h.client();
    let call = tokio::spawn(async move {
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await.unwrap().unwrap();
        (stream, first)
    });
    // The caller is registered (so its entries are never evicted) and asked the sync for the
    // missing SVID.
    tokio::time::timeout(HANG_GUARD, h.cache.usage().wanted())
        .await
        .expect("the waiting caller wakes the sync");
    assert_eq!(h.cache.usage().subscriber_count(), 1);
    assert!(!call.is_finished(), "no answer while an SVID is missing");

    put_svid(&h, "e2");
    let (stream, first) = tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/one", "spiffe://example.org/two"],
        "the first answer holds every identity"
    );
    // Served entries are recorded as used; the stream's end ends the subscription.
    let used = h.cache.usage().last_used();
    assert!(used.contains_key("e1") && used.contains_key("e2"));
    drop(stream);
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while h.cache.usage().subscriber_count() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn t12_the_wait_is_bounded_partial_answers_complete_on_the_stream() {
    let h = Harness::start_with_svid_wait(Duration::from_millis(300)).await;
    put_entry(&h, "e1", "spiffe://example.org/one");

    // No SVID at all: Unavailable (clients retry it), not PermissionDenied.
    let err = h
        .client()
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no X509-SVID available yet"),
        "{}",
        err.message()
    );

    // One of two: the answer after the wait carries it; the other follows on the stream.
    put_entry(&h, "e2", "spiffe://example.org/two");
    put_svid(&h, "e2");
    let mut client = h.client();
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap().unwrap();
    let ids: Vec<&str> = first.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/two"]);
    put_svid(&h, "e1");
    let second = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(second.svids.len(), 2);

    // No entry at all stays PermissionDenied at once.
    assert!(h.cache.remove_entry("e1") && h.cache.remove_entry("e2"));
    let end = next(&mut stream).await.unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    let err = h
        .client()
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "no identity issued");
}
