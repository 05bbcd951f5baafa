//! JWK encoding of public keys (EC P-256/P-384 and RSA), as SPIFFE bundles carry them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::key::{rsa_components, rsa_public_der, KeyType, PublicKeyInfo};

/// Why a JWK could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwkError {
    #[error("JWK member {0:?} is missing or not a string")]
    Missing(&'static str),
    #[error("JWK member {0:?} is not valid unpadded base64url")]
    BadBase64(&'static str),
    #[error("unsupported curve {0:?}")]
    UnsupportedCurve(String),
    #[error("JWK key parameters are invalid: {0}")]
    BadKey(String),
}

/// Writes the key parameters (`kty`, `crv`/`x`/`y` or `n`/`e`) of `spki` into `obj`.
pub(crate) fn write_key_params(spki: &[u8], obj: &mut Map<String, Value>) -> Result<(), JwkError> {
    let info = PublicKeyInfo::from_spki(spki).map_err(|e| JwkError::BadKey(e.to_string()))?;
    match info.key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let n = (info.raw.len() - 1) / 2;
            let crv = if info.key_type == KeyType::EcP256 {
                "P-256"
            } else {
                "P-384"
            };
            obj.insert("kty".into(), "EC".into());
            obj.insert("crv".into(), crv.into());
            obj.insert(
                "x".into(),
                URL_SAFE_NO_PAD.encode(&info.raw[1..1 + n]).into(),
            );
            obj.insert(
                "y".into(),
                URL_SAFE_NO_PAD.encode(&info.raw[1 + n..]).into(),
            );
        }
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
            let (n, e) = rsa_components(&info.raw)
                .ok_or_else(|| JwkError::BadKey("malformed RSA key".into()))?;
            obj.insert("kty".into(), "RSA".into());
            obj.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
            obj.insert("e".into(), URL_SAFE_NO_PAD.encode(e).into());
        }
    }
    Ok(())
}

fn b64_member(obj: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, JwkError> {
    let s = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or(JwkError::Missing(name))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwkError::BadBase64(name))
}

/// Reads an EC or RSA JWK into a DER SubjectPublicKeyInfo. Returns `Ok(None)` for a `kty` this
/// crate does not know (callers ignore such keys, as the bundle standard asks).
pub(crate) fn read_key_params(obj: &Map<String, Value>) -> Result<Option<Vec<u8>>, JwkError> {
    let kty = obj
        .get("kty")
        .and_then(Value::as_str)
        .ok_or(JwkError::Missing("kty"))?;
    let raw_spki = match kty {
        "EC" => {
            let crv = obj
                .get("crv")
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing("crv"))?;
            let len = match crv {
                "P-256" => 32,
                "P-384" => 48,
                other => return Err(JwkError::UnsupportedCurve(other.to_owned())),
            };
            let x = b64_member(obj, "x")?;
            let y = b64_member(obj, "y")?;
            if x.len() != len || y.len() != len {
                return Err(JwkError::BadKey(format!(
                    "{crv} coordinates must be {len} bytes each"
                )));
            }
            let mut point = vec![4u8];
            point.extend(x);
            point.extend(y);
            ec_spki(crv, &point)
        }
        "RSA" => {
            let n = b64_member(obj, "n")?;
            let e = b64_member(obj, "e")?;
            rsa_spki(&rsa_public_der(&n, &e))
        }
        _ => return Ok(None),
    };
    // Round-trip through the SPKI parser so that malformed keys are refused here.
    let info = PublicKeyInfo::from_spki(&raw_spki).map_err(|e| JwkError::BadKey(e.to_string()))?;
    if matches!(info.key_type, KeyType::EcP256 | KeyType::EcP384) {
        check_uncompressed_point(&info)?;
    }
    Ok(Some(info.spki))
}

/// Checks the point's encoding; whether it lies on the curve is checked by `ring` whenever the
/// key verifies a signature.
fn check_uncompressed_point(info: &PublicKeyInfo) -> Result<(), JwkError> {
    let want = if info.key_type == KeyType::EcP256 {
        65
    } else {
        97
    };
    if info.raw.len() != want || info.raw[0] != 4 {
        return Err(JwkError::BadKey("EC point is not uncompressed".into()));
    }
    Ok(())
}

fn ec_spki(crv: &str, point: &[u8]) -> Vec<u8> {
    use crate::key::der_tlv;
    let curve: &[u8] = if crv == "P-256" {
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
    } else {
        &[0x2b, 0x81, 0x04, 0x00, 0x22]
    };
    let mut alg = der_tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
    alg.extend(der_tlv(0x06, curve));
    let mut c = der_tlv(0x30, &alg);
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    c.extend(der_tlv(0x03, &bits));
    der_tlv(0x30, &c)
}

fn rsa_spki(rsa_pub: &[u8]) -> Vec<u8> {
    use crate::key::der_tlv;
    let mut alg = der_tlv(
        0x06,
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
    );
    alg.extend([0x05, 0x00]);
    let mut c = der_tlv(0x30, &alg);
    let mut bits = vec![0u8];
    bits.extend_from_slice(rsa_pub);
    c.extend(der_tlv(0x03, &bits));
    der_tlv(0x30, &c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{PrivateKey, Signer};

    #[test]
    fn ec_roundtrip() {
        for kt in [KeyType::EcP256, KeyType::EcP384] {
            let k = PrivateKey::generate(kt).unwrap_or_else(|e| panic!("{e}"));
            let mut obj = Map::new();
            write_key_params(k.public_key_spki(), &mut obj).unwrap_or_else(|e| panic!("{e}"));
            let back = read_key_params(&obj).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back.as_deref(), Some(k.public_key_spki()));
        }
    }

    #[test]
    fn unknown_kty_is_none_and_bad_members_error() {
        let mut obj = Map::new();
        obj.insert("kty".into(), "OKP".into());
        assert_eq!(read_key_params(&obj), Ok(None));
        obj.insert("kty".into(), "EC".into());
        obj.insert("crv".into(), "P-256".into());
        obj.insert("x".into(), "AAAA".into());
        obj.insert("y".into(), "AAAA".into());
        assert!(matches!(read_key_params(&obj), Err(JwkError::BadKey(_))));
        obj.insert("crv".into(), "P-521".into());
        assert!(matches!(
            read_key_params(&obj),
            Err(JwkError::UnsupportedCurve(_))
        ));
    }
}
