//! Conversions between protobuf messages and plinth types: the only place they meet.

use plinth_api::server as pb;
use plinth_spiffe::{Selector, Selectors, SpiffeId, TrustDomain, X509Svid};
use plinth_storage::{AttestedAgent, RegistrationEntry, StoredBundle, StoredJwtAuthority};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::Status;

fn bad(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {e}"))
}

/// A random UUID v4, as SPIRE makes join tokens.
pub fn new_uuid() -> Result<String, Status> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Status::internal("random generator failed"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    Ok(plinth_storage::entry_id::uuid_text(b))
}

pub fn selectors_from_proto(sel: &[pb::Selector]) -> Result<Selectors, Status> {
    sel.iter()
        .map(|s| Selector::new(&s.r#type, &s.value).map_err(|e| bad("selector", e)))
        .collect()
}

pub fn selectors_to_proto(sel: &Selectors) -> Vec<pb::Selector> {
    sel.iter()
        .map(|s| pb::Selector {
            r#type: s.kind().to_owned(),
            value: s.value().to_owned(),
        })
        .collect()
}

/// Validates an entry from the wire. The SPIFFE ID must be in `td`; IDs are parsed, never
/// normalised (reliability attack 2). `id` is generated when empty.
pub fn entry_from_proto(e: &pb::Entry, td: &TrustDomain) -> Result<RegistrationEntry, Status> {
    let spiffe_id = SpiffeId::new_with_path(&e.spiffe_id).map_err(|x| bad("spiffe_id", x))?;
    spiffe_id
        .require_member_of(td)
        .map_err(|x| bad("spiffe_id", x))?;
    // As SPIRE: a workload must never be able to hold a server's or an agent's identity (agents
    // and peers authenticate servers by `/spire/server`).
    if spiffe_id.path() == "/spire" || spiffe_id.path().starts_with("/spire/") {
        return Err(bad(
            "spiffe_id",
            "paths under /spire/ are reserved for servers and agents",
        ));
    }
    let parent_id = SpiffeId::new_with_path(&e.parent_id).map_err(|x| bad("parent_id", x))?;
    parent_id
        .require_member_of(td)
        .map_err(|x| bad("parent_id", x))?;
    let selectors = selectors_from_proto(&e.selectors)?;
    if selectors.is_empty() {
        return Err(Status::invalid_argument(
            "invalid selectors: at least one selector is required",
        ));
    }
    let ttl = |field: &str, v: i32| -> Result<u32, Status> {
        u32::try_from(v).map_err(|_| bad(field, "must not be negative"))
    };
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| TrustDomain::new(t).map_err(|x| bad("federates_with", x)))
        .collect::<Result<Vec<_>, _>>()?;
    if federates_with.iter().any(|f| f == td) {
        return Err(bad(
            "federates_with",
            "an entry cannot federate with its own trust domain",
        ));
    }
    for d in &e.dns_names {
        if !plinth_spiffe::x509::valid_dns_name(d) {
            return Err(bad("dns_names", format!("{d:?} is not a DNS name")));
        }
    }
    if e.hint.len() > 1024 {
        return Err(bad("hint", "longer than 1024 bytes"));
    }
    // Without an ID of the client's choosing, apply gives the entry the next one in log order
    // (plinth_storage::entry_id).
    let id = if e.id.is_empty() {
        String::new()
    } else {
        if e.id.len() > 255
            || !e
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(bad("id", "use up to 255 letters, digits, '-', '_' or '.'"));
        }
        e.id.clone()
    };
    Ok(RegistrationEntry {
        id,
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl: ttl("x509_svid_ttl", e.x509_svid_ttl)?,
        jwt_svid_ttl: ttl("jwt_svid_ttl", e.jwt_svid_ttl)?,
        federates_with,
        admin: e.admin,
        downstream: e.downstream,
        expires_at: (e.expires_at != 0).then_some(e.expires_at),
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        revision: 0,
        created_at: 0,
    })
}

pub fn entry_to_proto(e: &RegistrationEntry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: selectors_to_proto(&e.selectors),
        x509_svid_ttl: i32::try_from(e.x509_svid_ttl).unwrap_or(i32::MAX),
        jwt_svid_ttl: i32::try_from(e.jwt_svid_ttl).unwrap_or(i32::MAX),
        federates_with: e.federates_with.iter().map(|t| t.to_string()).collect(),
        admin: e.admin,
        downstream: e.downstream,
        expires_at: e.expires_at.unwrap_or(0),
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        revision: e.revision,
        created_at: e.created_at,
    }
}

pub fn agent_to_proto(a: &AttestedAgent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        x509_svid_serial_number: a.serial_number.clone(),
        x509_svid_expires_at: a.expires_at,
        selectors: selectors_to_proto(&a.selectors),
        banned: a.banned,
        can_reattest: a.attestation_type != "join_token",
        created_at: a.created_at,
    }
}

pub fn bundle_to_proto(b: &StoredBundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|j| pb::JwtAuthority {
                key_id: j.key_id.clone(),
                public_key: j.public_key_spki.clone(),
                expires_at: 0,
            })
            .collect(),
        refresh_hint: b
            .refresh_hint_secs
            .and_then(|h| i64::try_from(h).ok())
            .unwrap_or(0),
        sequence_number: b.sequence_number,
    }
}

/// Validates a bundle from the wire: every certificate and key must parse.
pub fn bundle_from_proto(b: &pb::Bundle) -> Result<StoredBundle, Status> {
    let td = TrustDomain::new(&b.trust_domain).map_err(|e| bad("trust_domain", e))?;
    let mut check = plinth_spiffe::Bundle::new(td.clone());
    for c in &b.x509_authorities {
        check
            .add_x509_authority(c.clone())
            .map_err(|e| bad("x509_authorities", e))?;
    }
    for j in &b.jwt_authorities {
        plinth_spiffe::key::PublicKeyInfo::from_spki(&j.public_key)
            .map_err(|e| bad("jwt_authorities", e))?;
        check
            .add_jwt_authority(plinth_spiffe::JwtAuthority {
                key_id: j.key_id.clone(),
                public_key_spki: j.public_key.clone(),
            })
            .map_err(|e| bad("jwt_authorities", e))?;
    }
    Ok(StoredBundle {
        trust_domain: td,
        x509_authorities: check.x509_authorities().to_vec(),
        jwt_authorities: check
            .jwt_authorities()
            .iter()
            .map(|j| StoredJwtAuthority {
                key_id: j.key_id.clone(),
                public_key_spki: j.public_key_spki.clone(),
            })
            .collect(),
        refresh_hint_secs: u64::try_from(b.refresh_hint).ok().filter(|h| *h > 0),
        sequence_number: b.sequence_number,
    })
}

pub fn svid_to_proto(s: &X509Svid) -> pb::X509Svid {
    pb::X509Svid {
        spiffe_id: s.spiffe_id.to_string(),
        cert_chain: s.chain.clone(),
        expires_at: s.not_after.unix_timestamp(),
    }
}

/// Hex serial of a DER certificate, lowercase (as stored for agents).
pub fn serial_hex(der: &[u8]) -> Result<String, Status> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| Status::internal(format!("issued certificate does not parse: {e}")))?;
    Ok(hex::encode(c.raw_serial()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    /// The five fields of `id`, checked to be a UUID of `version` with the RFC 9562 variant.
    fn uuid_fields(id: &str, version: char) -> Vec<&str> {
        let f: Vec<&str> = id.split('-').collect();
        let lens: Vec<usize> = f.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
        assert!(
            id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(f[2].starts_with(version), "version {version}: {id}");
        assert!(matches!(&f[3][..1], "8" | "9" | "a" | "b"), "variant: {id}");
        f
    }

    #[test]
    fn join_tokens_are_random_uuid_v4() {
        let many: std::collections::HashSet<String> = (0..1000)
            .map(|_| {
                let t = new_uuid().unwrap();
                uuid_fields(&t, '4');
                t
            })
            .collect();
        assert_eq!(many.len(), 1000);
    }

    #[test]
    fn an_entry_keeps_the_id_its_client_chose_or_is_left_for_apply_to_number() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut e = pb::Entry {
            spiffe_id: "spiffe://example.org/w".into(),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            ..Default::default()
        };
        assert_eq!(entry_from_proto(&e, &td).unwrap().id, "");
        e.id = "my-entry.1".into();
        assert_eq!(entry_from_proto(&e, &td).unwrap().id, "my-entry.1");
        e.id = "no spaces".into();
        let err = entry_from_proto(&e, &td).unwrap_err();
        assert!(err.message().starts_with("invalid id"), "{err:?}");
    }
}
