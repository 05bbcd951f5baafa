//! What plinth can do today, end to end in one process: a trust domain CA, an X509-SVID and a
//! JWT-SVID issued and verified, and the trust bundle as a SPIFFE JWK Set.
//!
//! Run: `cargo run -p plinth-spiffe --example demo`
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::x509::{self, verify_svid};
use plinth_spiffe::{
    jwt, Bundle, CaTemplate, Csr, JwtAuthority, JwtSvidParams, KeyType, PrivateKey, Signer,
    SpiffeId, SvidRequest, TrustDomain, X509Authority,
};
use time::OffsetDateTime;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let now = OffsetDateTime::now_utc();
    let td = TrustDomain::new("example.org")?;
    println!("trust domain: {td}");

    let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256)?);
    let ca_der = x509::self_signed_ca(
        &CaTemplate::new(td.clone(), now, Duration::from_secs(24 * 3600)),
        ca_key.clone(),
    )?;
    let ca = X509Authority::new(ca_der.clone(), vec![], ca_key.clone())?;
    println!("CA: self-signed ec-p256, valid until {}", ca.not_after());

    // A workload key and CSR, as an agent makes them; the SPIFFE ID comes from the entry.
    let workload_key = Arc::new(PrivateKey::generate(KeyType::EcP256)?);
    let csr = Csr::parse(&Csr::create(workload_key.clone())?)?;
    let id = SpiffeId::new("spiffe://example.org/ns/demo/sa/web")?;
    let svid = ca.sign_svid(
        &SvidRequest {
            spiffe_id: &id,
            public_key_spki: csr.public_key_spki(),
            ttl: Duration::from_secs(3600),
            dns_names: &["web.demo.svc".to_string()],
        },
        now,
    )?;

    // JWT-SVIDs are signed by a separate JWT authority key, published in the bundle by key ID.
    let jwt_key = PrivateKey::generate(KeyType::EcP256)?;
    let mut bundle = Bundle::new(td.clone());
    bundle.add_x509_authority(ca_der)?;
    bundle.add_jwt_authority(JwtAuthority {
        key_id: "demo-jwt-key".into(),
        public_key_spki: jwt_key.public_key_spki().to_vec(),
    })?;
    bundle.set_sequence_number(1);

    let verified = verify_svid(&svid.chain, &bundle, now)?;
    println!(
        "\nX509-SVID for {} (verified against the bundle, expires {})",
        verified.spiffe_id, verified.not_after
    );
    print!("{}", svid.chain_pem());

    let audience = vec!["spiffe://example.org/db".to_string()];
    let (token, exp) = jwt::mint(
        &jwt_key,
        &JwtSvidParams {
            subject: &id,
            audience: &audience,
            ttl: Duration::from_secs(300),
            key_id: "demo-jwt-key",
            alg: None,
        },
        now,
    )?;
    let claims = jwt::validate(&token, &bundle, &audience[0], now)?;
    println!(
        "\nJWT-SVID (ES256, expires {exp}), validated for audience {}: sub={}",
        audience[0], claims.spiffe_id
    );
    println!("{token}");

    println!("\ntrust bundle (SPIFFE JWK Set):\n{}", bundle.to_jwks()?);

    let refused = jwt::validate(&token, &bundle, "spiffe://example.org/other", now);
    if let Err(e) = refused {
        println!("\na token presented to the wrong audience is refused: {e}");
    }
    Ok(())
}
