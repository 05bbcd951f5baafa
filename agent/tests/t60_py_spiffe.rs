//! Interoperability with the real py-spiffe client (PyPI `spiffe`, see tests/requirements.txt).
//! The test fails, never skips, when python3 or the package is missing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_py_spiffe_fetches_svids_bundles_and_jwts() {
    let h = Harness::start().await;
    let mut web = entry("e1", "spiffe://example.org/web", &[&my_selector()]);
    web.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
    h.add(web);
    h.add(entry("e2", "spiffe://example.org/web2", &[&my_selector()]));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/py_spiffe_client.py");
    let socket = format!("unix://{}", h.socket.display());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("SPIFFE_ENDPOINT_SOCKET", socket)
            .output()
            .expect("python3 must be installed")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-spiffe client failed (pip install -r agent/tests/requirements.txt):\n{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["x509_ids"],
        serde_json::json!(["spiffe://example.org/web", "spiffe://example.org/web2"])
    );
    assert_eq!(v["default_id"], "spiffe://example.org/web");
    assert_eq!(v["chain_len"], 1);
    assert_eq!(v["context_ids"], v["x509_ids"]);
    assert_eq!(
        v["x509_bundle_tds"],
        serde_json::json!(["example.org", "partner.test"])
    );
    assert_eq!(v["own_x509_authorities"], 1);
    assert_eq!(v["jwt_id"], "spiffe://example.org/web");
    assert_eq!(v["jwt_audience"], serde_json::json!(["svc-a", "svc-b"]));
    assert_eq!(
        v["jwt_bundle_tds"],
        serde_json::json!(["example.org", "partner.test"])
    );
    assert_eq!(v["local_validate_id"], "spiffe://example.org/web");
    assert_eq!(v["validate_id"], "spiffe://example.org/web");
    assert_ne!(v["wrong_audience"], "accepted");
}
