#![allow(clippy::unwrap_used)]
//! JWT-SVID mint and validation, with PyJWT as an independent validator.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use plinth_spiffe::jwt::{self, JwtError};
use plinth_spiffe::key::ecdsa_der_to_fixed;
use plinth_spiffe::{
    Bundle, BundleSet, JwtAlg, JwtAuthority, JwtSvidParams, KeyType, PrivateKey, SignatureScheme,
    Signer, SpiffeId,
};
use serde_json::{json, Value};

fn sub() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/web").unwrap()
}

fn bundle_with(k: &dyn Signer, kid: &str) -> Bundle {
    let mut b = Bundle::new(td("example.org"));
    b.add_jwt_authority(JwtAuthority {
        key_id: kid.into(),
        public_key_spki: k.public_key_spki().to_vec(),
    })
    .unwrap();
    b
}

fn mint(k: &dyn Signer, alg: Option<JwtAlg>, aud: &[&str]) -> String {
    let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
    jwt::mint(
        k,
        &JwtSvidParams {
            subject: &sub(),
            audience: &aud,
            ttl: Duration::from_secs(300),
            key_id: "kid-1",
            alg,
        },
        now(),
    )
    .unwrap()
    .0
}

/// Signs arbitrary header and claims with an EC P-256 key, to build hostile tokens.
fn forge(k: &PrivateKey, header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let der = k
        .sign(SignatureScheme::EcdsaP256Sha256, input.as_bytes())
        .unwrap();
    let sig = ecdsa_der_to_fixed(&der, 32).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[test]
fn t10_roundtrip_every_algorithm() {
    let ec256 = key(KeyType::EcP256);
    let ec384 = key(KeyType::EcP384);
    let rsa = openssl_rsa_key(2048);
    let cases: Vec<(Arc<PrivateKey>, Option<JwtAlg>, &str)> = vec![
        (ec256, None, "ES256"),
        (ec384, None, "ES384"),
        (rsa.clone(), None, "RS256"),
        (rsa.clone(), Some(JwtAlg::PS256), "PS256"),
        (rsa.clone(), Some(JwtAlg::RS512), "RS512"),
    ];
    for (k, alg, want_alg) in cases {
        let token = mint(k.as_ref(), alg, &["db", "cache"]);
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], want_alg);
        assert_eq!(header["kid"], "kid-1");
        assert_eq!(header["typ"], "JWT");
        let v = jwt::validate(&token, &bundle_with(k.as_ref(), "kid-1"), "cache", now()).unwrap();
        assert_eq!(v.spiffe_id, sub());
        assert_eq!(v.audience, vec!["db", "cache"]);
        assert_eq!(v.claims["iat"], now().unix_timestamp());
        assert_eq!(v.expiry, now() + time::Duration::seconds(300));
    }
}

#[test]
fn t11_mint_refuses_bad_params() {
    let k = key(KeyType::EcP256);
    let s = sub();
    let base = |aud: Vec<String>, kid: &'static str, ttl: u64, alg| {
        jwt::mint(
            k.as_ref(),
            &JwtSvidParams {
                subject: &s,
                audience: &aud,
                ttl: Duration::from_secs(ttl),
                key_id: kid,
                alg,
            },
            now(),
        )
        .map(|_| ())
    };
    assert_eq!(base(vec![], "k", 60, None), Err(JwtError::EmptyAudience));
    assert_eq!(
        base(vec!["".into()], "k", 60, None),
        Err(JwtError::EmptyAudience)
    );
    assert_eq!(
        base(vec!["a".into()], "", 60, None),
        Err(JwtError::EmptyKid)
    );
    assert_eq!(base(vec!["a".into()], "k", 0, None), Err(JwtError::ZeroTtl));
    assert_eq!(
        base(vec!["a".into()], "k", 60, Some(JwtAlg::RS256)),
        Err(JwtError::SignerAlgMismatch {
            alg: JwtAlg::RS256,
            key_type: KeyType::EcP256
        })
    );
}

#[test]
fn t20_rejections_per_the_standard() {
    let k = key(KeyType::EcP256);
    let b = bundle_with(k.as_ref(), "kid-1");
    let exp = now().unix_timestamp() + 60;
    let hdr = json!({"alg": "ES256", "kid": "kid-1", "typ": "JWT"});
    let good = json!({"sub": sub().as_str(), "aud": "a", "exp": exp});
    // Sanity: the forged-but-correct token validates, so each failure below is its edit.
    assert!(jwt::validate(&forge(&k, hdr.clone(), good.clone()), &b, "a", now()).is_ok());

    let v = |t: &str| jwt::validate(t, &b, "a", now()).err();
    let claims = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        forge(&k, hdr.clone(), c)
    };
    let header = |edit: &dyn Fn(&mut Value)| {
        let mut h = hdr.clone();
        edit(&mut h);
        forge(&k, h, good.clone())
    };
    assert_eq!(
        v(&claims(&|c| {
            c.as_object_mut().unwrap().remove("aud");
        })),
        Some(JwtError::MissingAudience)
    );
    assert_eq!(
        v(&claims(&|c| c["aud"] = json!([]))),
        Some(JwtError::MissingAudience)
    );
    assert_eq!(
        v(&claims(&|c| {
            c.as_object_mut().unwrap().remove("exp");
        })),
        Some(JwtError::MissingExpiry)
    );
    assert_eq!(
        v(&claims(&|c| c["exp"] = json!(now().unix_timestamp()))),
        Some(JwtError::Expired)
    );
    assert_eq!(
        v(&claims(&|c| c["nbf"] = json!(now().unix_timestamp() + 10))),
        Some(JwtError::NotYetValid)
    );
    assert_eq!(
        v(&claims(&|c| c["aud"] = json!(["b", "c"]))),
        Some(JwtError::AudienceMismatch {
            expected: "a".into(),
            actual: vec!["b".into(), "c".into()]
        })
    );
    assert_eq!(
        v(&claims(&|c| {
            c.as_object_mut().unwrap().remove("sub");
        })),
        Some(JwtError::MissingSubject)
    );
    assert!(matches!(
        v(&claims(&|c| c["sub"] = json!("spiffe://example.org/a/../b"))),
        Some(JwtError::BadSubject(_))
    ));
    assert_eq!(
        v(&header(&|h| h["typ"] = json!("at+jwt"))),
        Some(JwtError::BadType("\"at+jwt\"".into()))
    );
    assert!(v(&header(&|h| h["typ"] = json!("JOSE"))).is_none());
    assert_eq!(
        v(&header(&|h| {
            h.as_object_mut().unwrap().remove("kid");
        })),
        Some(JwtError::MissingKid)
    );
    assert_eq!(
        v(&header(&|h| h["kid"] = json!("other"))),
        Some(JwtError::UnknownKid {
            kid: "other".into(),
            td: "example.org".into()
        })
    );
    assert!(matches!(
        v(&header(&|h| h["crit"] = json!(["exp"]))),
        Some(JwtError::CriticalHeader(_))
    ));
    for alg in ["none", "HS256", "ES512", "EdDSA", ""] {
        assert_eq!(
            v(&header(&|h| h["alg"] = json!(alg))),
            Some(JwtError::UnsupportedAlgorithm(alg.into())),
            "alg {alg}"
        );
    }
    // alg says RSA, key is EC.
    assert!(matches!(
        v(&header(&|h| h["alg"] = json!("RS256"))),
        Some(JwtError::KeyAlgMismatch { .. })
    ));
    // Unsigned token in the classic `alg: none` form.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg":"none","kid":"kid-1"}).to_string()),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    assert_eq!(
        v(&none),
        Some(JwtError::UnsupportedAlgorithm("none".into()))
    );
    // Claims changed after signing.
    let token = forge(&k, hdr.clone(), good.clone());
    let mut parts: Vec<&str> = token.split('.').collect();
    let evil = URL_SAFE_NO_PAD
        .encode(json!({"sub": "spiffe://example.org/admin", "aud": "a", "exp": exp}).to_string());
    parts[1] = &evil;
    assert_eq!(v(&parts.join(".")), Some(JwtError::BadSignature));
    // Structure.
    assert_eq!(v("a.b"), Some(JwtError::Malformed));
    assert_eq!(v("a.b.c.d"), Some(JwtError::Malformed));
    assert_eq!(v("!!.b.c"), Some(JwtError::BadPart("header")));
    assert_eq!(
        v(&"a".repeat(jwt::MAX_TOKEN_LEN + 1)),
        Some(JwtError::TooLarge(jwt::MAX_TOKEN_LEN + 1))
    );
    assert_eq!(
        jwt::validate(&token, &b, "", now()).err(),
        Some(JwtError::EmptyAudience)
    );
}

#[test]
fn t21_kid_from_another_trust_domain_is_rejected() {
    // Trust domain other.org publishes kid-1; a token claiming example.org must be checked
    // against example.org's keys only.
    let attacker = key(KeyType::EcP256);
    let victim = key(KeyType::EcP256);
    let mut set = BundleSet::new();
    let mut other = Bundle::new(td("other.org"));
    other
        .add_jwt_authority(JwtAuthority {
            key_id: "kid-1".into(),
            public_key_spki: attacker.public_key_spki().to_vec(),
        })
        .unwrap();
    set.insert(other);
    let token = mint(attacker.as_ref(), None, &["a"]);
    assert_eq!(
        jwt::validate(&token, &set, "a", now()).err(),
        Some(JwtError::NoBundle("example.org".into()))
    );
    let mut own = Bundle::new(td("example.org"));
    own.add_jwt_authority(JwtAuthority {
        key_id: "kid-2".into(),
        public_key_spki: victim.public_key_spki().to_vec(),
    })
    .unwrap();
    set.insert(own);
    assert_eq!(
        jwt::validate(&token, &set, "a", now()).err(),
        Some(JwtError::UnknownKid {
            kid: "kid-1".into(),
            td: "example.org".into()
        })
    );
}

#[test]
fn t40_pyjwt_validates_minted_tokens_against_the_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(
        dir.path(),
        "check.py",
        r#"
import json, sys, jwt
jwks = json.load(open(sys.argv[1]))
token = open(sys.argv[2]).read().strip()
header = jwt.get_unverified_header(token)
match = [k for k in jwks["keys"] if k.get("use") == "jwt-svid" and k.get("kid") == header["kid"]]
key = jwt.PyJWK(match[0], algorithm=header["alg"]).key
claims = jwt.decode(token, key, algorithms=[header["alg"]], audience=sys.argv[3],
                    options={"require": ["exp", "aud", "sub"], "verify_iat": False})
print(header["alg"], claims["sub"], json.dumps(claims["aud"]))
"#,
    );
    let rsa = openssl_rsa_key(2048);
    for (k, alg) in [
        (key(KeyType::EcP256), None),
        (key(KeyType::EcP384), None),
        (rsa.clone(), None),
        (rsa, Some(JwtAlg::PS256)),
    ] {
        let aud = vec!["spiffe://example.org/db".to_string()];
        let (token, _) = jwt::mint(
            k.as_ref(),
            &JwtSvidParams {
                subject: &sub(),
                audience: &aud,
                ttl: Duration::from_secs(300),
                key_id: "kid-py",
                alg,
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        let jwks = bundle_with(k.as_ref(), "kid-py").to_jwks().unwrap();
        let jwks_path = write(dir.path(), "jwks.json", &jwks);
        let token_path = write(dir.path(), "token", &token);
        let run = |aud: &str| {
            Command::new("python3")
                .arg(&script)
                .arg(&jwks_path)
                .arg(&token_path)
                .arg(aud)
                .output()
                .expect("python3 must be installed (see README)")
        };
        let out = run("spiffe://example.org/db");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "PyJWT rejected our {alg:?} token: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("spiffe://example.org/web"), "{stdout}");
        // And PyJWT rejects a wrong audience, so the check above is meaningful.
        assert!(!run("spiffe://example.org/other").status.success());
    }
}
