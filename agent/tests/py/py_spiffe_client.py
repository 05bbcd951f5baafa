"""Drives plinth's Workload API with the real py-spiffe client (PyPI `spiffe`).

Run by agent/tests/t60_py_spiffe.rs with SPIFFE_ENDPOINT_SOCKET set; prints one JSON object of
what the client saw, which the Rust test checks. Any exception fails the run.
"""

import json

from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

OWN = TrustDomain("example.org")

client = WorkloadApiClient(default_timeout=20)
out = {}

svids = client.fetch_x509_svids()
out["x509_ids"] = [str(s.spiffe_id) for s in svids]
default = client.fetch_x509_svid()
out["default_id"] = str(default.spiffe_id)
out["chain_len"] = len(default.cert_chain)

ctx = client.fetch_x509_context()
out["context_ids"] = [str(s.spiffe_id) for s in ctx.x509_svids]

bundles = client.fetch_x509_bundles()
out["x509_bundle_tds"] = sorted(str(b.trust_domain) for b in bundles.bundles)
out["own_x509_authorities"] = len(bundles.get_bundle_for_trust_domain(OWN).x509_authorities)

jwt = client.fetch_jwt_svid(audience={"svc-a", "svc-b"})
out["jwt_id"] = str(jwt.spiffe_id)
out["jwt_audience"] = sorted(jwt.audience)

jwt_bundles = client.fetch_jwt_bundles()
out["jwt_bundle_tds"] = sorted(str(b.trust_domain) for b in jwt_bundles.bundles)
own = jwt_bundles.get_bundle_for_trust_domain(OWN)
# Validate locally with py-spiffe's own verifier against the JWKS the agent served.
local = JwtSvid.parse_and_validate(jwt.token, own, {"svc-a"})
out["local_validate_id"] = str(local.spiffe_id)

validated = client.validate_jwt_svid(jwt.token, "svc-b")
out["validate_id"] = str(validated.spiffe_id)
try:
    client.validate_jwt_svid(jwt.token, "not-an-audience")
    out["wrong_audience"] = "accepted"
except Exception as e:  # noqa: BLE001 - the type name is what the test checks
    out["wrong_audience"] = type(e).__name__

print(json.dumps(out))
