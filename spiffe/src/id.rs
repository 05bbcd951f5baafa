//! SPIFFE IDs and trust domains, parsed per the SPIFFE-ID standard.
//!
//! Parsing rejects; it never normalises. For every accepted input `s`,
//! `SpiffeId::try_from(s)?.to_string() == s`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The only scheme a SPIFFE ID may have, with its separator.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID accepted, in bytes. plinth never generates longer ones either.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("scheme is missing or invalid: a SPIFFE ID starts with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and \
         underscores (found {found:?} at byte {position})"
    )]
    BadTrustDomainChar { found: char, position: usize },
    #[error("trust domain is {len} bytes; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong { len: usize },
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores \
         (found {found:?} at byte {position})"
    )]
    BadPathChar { found: char, position: usize },
    #[error("path cannot contain empty segments")]
    EmptySegment,
    #[error("path cannot contain dot segments (\".\" or \"..\")")]
    DotSegment,
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    #[error("path must be empty or start with \"/\"")]
    PathMissingSlash,
    #[error("SPIFFE ID is {len} bytes; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong { len: usize },
    #[error("{id:?} has a path; a trust domain is given as a name or as a SPIFFE ID with no path")]
    TrustDomainHasPath { id: String },
    #[error("SPIFFE ID {id:?} has no path; a path is required here")]
    RootIdNotAllowed { id: String },
    #[error("SPIFFE ID {id:?} is not a member of trust domain {trust_domain:?}")]
    WrongTrustDomain { id: String, trust_domain: String },
}

fn is_td_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// Character at byte `pos` of `s`, for error messages (handles multi-byte input).
fn char_at(s: &str, pos: usize) -> char {
    s.get(pos..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or('\u{FFFD}')
}

fn validate_trust_domain_name(name: &str, offset: usize) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if let Some(i) = name.bytes().position(|b| !is_td_char(b)) {
        return Err(IdError::BadTrustDomainChar {
            found: char_at(name, i),
            position: offset + i,
        });
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: name.len() });
    }
    Ok(())
}

/// Validates a SPIFFE ID path (`""` or `/seg/seg...`). `offset` is where the path starts in the
/// whole ID, for error positions.
fn validate_path(path: &str, offset: usize) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(IdError::PathMissingSlash);
    }
    let mut seg_start = 1;
    for segment in path[1..].split('/') {
        match segment {
            "" => {
                return Err(if seg_start == path.len() {
                    IdError::TrailingSlash
                } else {
                    IdError::EmptySegment
                })
            }
            "." | ".." => return Err(IdError::DotSegment),
            _ => {}
        }
        if let Some(i) = segment.bytes().position(|b| !is_path_char(b)) {
            return Err(IdError::BadPathChar {
                found: char_at(segment, i),
                position: offset + seg_start + i,
            });
        }
        seg_start += segment.len() + 1;
    }
    Ok(())
}

/// A SPIFFE trust domain name, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a trust domain from its bare name (`example.org`) or from its SPIFFE ID form
    /// (`spiffe://example.org`, no path).
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.contains(":/") {
            let id = SpiffeId::new(s)?;
            if !id.is_root() {
                return Err(IdError::TrustDomainHasPath { id: id.s });
            }
            return Ok(id.trust_domain());
        }
        validate_trust_domain_name(s, 0)?;
        Ok(Self { name: s.to_owned() })
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            td_len: self.name.len(),
            s: format!("{SCHEME_PREFIX}{}", self.name),
        }
    }

    /// `spiffe://<name>` as a string (the key used in Workload API bundle maps).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.name)
    }

    /// Builds a SPIFFE ID in this trust domain from a path (`""` or `/a/b`).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, IdError> {
        validate_path(path, SCHEME_PREFIX.len() + self.name.len())?;
        let s = format!("{SCHEME_PREFIX}{}{path}", self.name);
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        Ok(SpiffeId {
            td_len: self.name.len(),
            s,
        })
    }

    /// Builds a SPIFFE ID from path segments, each validated (no `/` inside a segment).
    pub fn id_from_segments<S: AsRef<str>>(&self, segments: &[S]) -> Result<SpiffeId, IdError> {
        let mut path = String::new();
        for seg in segments {
            path.push('/');
            path.push_str(seg.as_ref());
        }
        // A '/' inside a segment would silently add a segment; reject it explicitly.
        if let Some(seg) = segments.iter().find(|s| s.as_ref().contains('/')) {
            let seg = seg.as_ref();
            let i = seg.find('/').unwrap_or(0);
            return Err(IdError::BadPathChar {
                found: '/',
                position: i,
            });
        }
        self.id_with_path(&path)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for TrustDomain {
    type Error = IdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    s: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, rejecting anything the standard forbids.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdError::WrongScheme)?;
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        validate_trust_domain_name(td, SCHEME_PREFIX.len())?;
        validate_path(path, SCHEME_PREFIX.len() + td.len())?;
        Ok(Self {
            s: s.to_owned(),
            td_len: td.len(),
        })
    }

    /// Parses an ID that must have a path (workload and agent IDs).
    pub fn new_with_path(s: &str) -> Result<Self, IdError> {
        let id = Self::new(s)?;
        if id.is_root() {
            return Err(IdError::RootIdNotAllowed { id: id.s });
        }
        Ok(id)
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The trust domain name, without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.s[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len]
    }

    /// The path: `""` for a trust domain ID, else `/seg/...`.
    pub fn path(&self) -> &str {
        &self.s[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// True for the trust domain's own ID (no path).
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// True if this ID is in trust domain `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name
    }

    /// Fails unless this ID is in `td`.
    pub fn require_member_of(&self, td: &TrustDomain) -> Result<(), IdError> {
        if self.is_member_of(td) {
            Ok(())
        } else {
            Err(IdError::WrongTrustDomain {
                id: self.s.clone(),
                trust_domain: td.name.clone(),
            })
        }
    }

    /// The whole ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.s
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.s)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.s)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.s
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.s)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://a-b_c.d9/ns/Prod/sa/Default_1.x",
            "spiffe://x/a.../..b/.c",
        ] {
            let id = SpiffeId::new(s).expect(s);
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::new("spiffe://example.org/a/b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/a/b");
        assert!(!id.is_root());
    }

    #[test]
    fn rejects_each_class_with_its_error() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://example.org/a", IdError::WrongScheme),
            ("SPIFFE://example.org/a", IdError::WrongScheme),
            ("spiffe:/example.org", IdError::WrongScheme),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe:///path", IdError::MissingTrustDomain),
            (
                "spiffe://Example.org",
                IdError::BadTrustDomainChar {
                    found: 'E',
                    position: 9,
                },
            ),
            (
                "spiffe://example.org:8080/a",
                IdError::BadTrustDomainChar {
                    found: ':',
                    position: 20,
                },
            ),
            (
                "spiffe://user@example.org/a",
                IdError::BadTrustDomainChar {
                    found: '@',
                    position: 13,
                },
            ),
            (
                "spiffe://ex%41mple.org",
                IdError::BadTrustDomainChar {
                    found: '%',
                    position: 11,
                },
            ),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org/a/", IdError::TrailingSlash),
            ("spiffe://example.org//a", IdError::EmptySegment),
            ("spiffe://example.org/a/../b", IdError::DotSegment),
            ("spiffe://example.org/./b", IdError::DotSegment),
            ("spiffe://example.org/..", IdError::DotSegment),
            (
                "spiffe://example.org/%2e%2e",
                IdError::BadPathChar {
                    found: '%',
                    position: 21,
                },
            ),
            (
                "spiffe://example.org/a?x=1",
                IdError::BadPathChar {
                    found: '?',
                    position: 22,
                },
            ),
            (
                "spiffe://example.org/a#frag",
                IdError::BadPathChar {
                    found: '#',
                    position: 22,
                },
            ),
            (
                "spiffe://example.org/caf\u{e9}",
                IdError::BadPathChar {
                    found: '\u{e9}',
                    position: 24,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::new(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::new(&td).is_ok());
        assert_eq!(
            TrustDomain::new(&format!("{td}a")),
            Err(IdError::TrustDomainTooLong { len: 256 })
        );
        let base = "spiffe://example.org/";
        let ok = format!("{base}{}", "a".repeat(MAX_SPIFFE_ID_LEN - base.len()));
        assert!(SpiffeId::new(&ok).is_ok());
        let long = format!("{ok}a");
        assert_eq!(SpiffeId::new(&long), Err(IdError::TooLong { len: 2049 }));
    }

    #[test]
    fn trust_domain_forms() {
        let td = TrustDomain::new("example.org").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(TrustDomain::new("spiffe://example.org").as_ref(), Ok(&td));
        assert!(TrustDomain::new("spiffe://example.org/a").is_err());
        assert!(TrustDomain::new("").is_err());
        assert_eq!(td.id_string(), "spiffe://example.org");
        assert!(td.id().is_root());
        let id = td
            .id_from_segments(&["spire", "agent", "join_token", "abc"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/spire/agent/join_token/abc"
        );
        assert!(td.id_from_segments(&["a/b"]).is_err());
        assert!(td.id_from_segments(&[".."]).is_err());
        assert!(td.id_from_segments(&[""]).is_err());
    }

    #[test]
    fn membership() {
        let id = SpiffeId::new("spiffe://a.org/x").unwrap_or_else(|e| panic!("{e}"));
        let a = TrustDomain::new("a.org").unwrap_or_else(|e| panic!("{e}"));
        let b = TrustDomain::new("b.org").unwrap_or_else(|e| panic!("{e}"));
        assert!(id.require_member_of(&a).is_ok());
        assert!(matches!(
            id.require_member_of(&b),
            Err(IdError::WrongTrustDomain { .. })
        ));
        assert!(SpiffeId::new_with_path("spiffe://a.org").is_err());
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId =
            serde_json::from_str("\"spiffe://a.org/x\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.as_str(), "spiffe://a.org/x");
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://a.org/../x\"").is_err());
    }
}
