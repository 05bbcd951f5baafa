//! Selectors (`type:value`) and the matching rule of registration entries.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest selector type accepted, in bytes.
pub const MAX_SELECTOR_TYPE_LEN: usize = 64;
/// Longest selector value accepted, in bytes. Bounds what a workload can make an agent hold.
pub const MAX_SELECTOR_VALUE_LEN: usize = 2048;

/// Why a string is not a valid selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    #[error("selector {0:?} must be of the form type:value")]
    MissingColon(String),
    #[error("selector type is empty")]
    EmptyType,
    #[error("selector value is empty")]
    EmptyValue,
    #[error("selector type {0:?} may only contain letters, digits, '_', '-' and '.'")]
    BadType(String),
    #[error("selector type is {0} bytes; at most {MAX_SELECTOR_TYPE_LEN} are allowed")]
    TypeTooLong(usize),
    #[error("selector value is {0} bytes; at most {MAX_SELECTOR_VALUE_LEN} are allowed")]
    ValueTooLong(usize),
    #[error("selector value contains a control character")]
    ControlChar,
}

/// One selector: a type (`unix`, `docker`, `k8s`, ...) and a value that may itself contain colons
/// (`uid:1000`, `label:app:web`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its two parts, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if kind.len() > MAX_SELECTOR_TYPE_LEN {
            return Err(SelectorError::TypeTooLong(kind.len()));
        }
        if !kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(SelectorError::BadType(kind.to_owned()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN {
            return Err(SelectorError::ValueTooLong(value.len()));
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `type:value`; everything after the first colon is the value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingColon(s.to_owned()))?;
        Self::new(kind, value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({}:{})", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Selector::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A set of selectors, kept sorted and free of duplicates.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Selectors(BTreeSet<Selector>);

impl Selectors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses each `type:value` string.
    pub fn parse_all<S: AsRef<str>>(items: &[S]) -> Result<Self, SelectorError> {
        items
            .iter()
            .map(|s| Selector::parse(s.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Adds a selector; returns false if it was already present.
    pub fn insert(&mut self, s: Selector) -> bool {
        self.0.insert(s)
    }

    /// Number of distinct selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are no selectors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True if `s` is in the set.
    pub fn contains(&self, s: &Selector) -> bool {
        self.0.contains(s)
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// The registration-entry matching rule: an entry with these selectors applies to a caller
    /// whose attested selectors are `caller` when every one of the entry's selectors is among the
    /// caller's. An entry with no selectors matches nothing.
    pub fn matched_by(&self, caller: &Selectors) -> bool {
        !self.0.is_empty() && self.0.is_subset(&caller.0)
    }
}

impl fmt::Debug for Selectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.0.iter().map(|s| s.to_string()))
            .finish()
    }
}

impl FromIterator<Selector> for Selectors {
    fn from_iter<T: IntoIterator<Item = Selector>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Selectors {
    type Item = &'a Selector;
    type IntoIter = std::collections::btree_set::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn value_keeps_colons() {
        let s = sel("docker:label:app:web");
        assert_eq!(s.kind(), "docker");
        assert_eq!(s.value(), "label:app:web");
        assert_eq!(s.to_string(), "docker:label:app:web");
    }

    #[test]
    fn rejects_bad_selectors() {
        assert_eq!(
            Selector::parse("unix"),
            Err(SelectorError::MissingColon("unix".into()))
        );
        assert_eq!(Selector::parse(":x"), Err(SelectorError::EmptyType));
        assert_eq!(Selector::parse("unix:"), Err(SelectorError::EmptyValue));
        assert_eq!(
            Selector::parse("un ix:uid:1"),
            Err(SelectorError::BadType("un ix".into()))
        );
        assert_eq!(
            Selector::parse("unix:uid:\n1"),
            Err(SelectorError::ControlChar)
        );
        let huge = format!("unix:{}", "a".repeat(MAX_SELECTOR_VALUE_LEN + 1));
        assert_eq!(
            Selector::parse(&huge),
            Err(SelectorError::ValueTooLong(MAX_SELECTOR_VALUE_LEN + 1))
        );
    }

    #[test]
    fn matching_requires_all_entry_selectors() {
        let entry = Selectors::parse_all(&["unix:uid:1000", "unix:gid:1000"]).unwrap_or_default();
        let caller = Selectors::parse_all(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"])
            .unwrap_or_default();
        let partial = Selectors::parse_all(&["unix:uid:1000"]).unwrap_or_default();
        assert!(entry.matched_by(&caller));
        assert!(!entry.matched_by(&partial));
        assert!(
            !Selectors::new().matched_by(&caller),
            "empty entry matches nothing"
        );
    }

    #[test]
    fn set_dedups_and_sorts() {
        let s = Selectors::parse_all(&["b:1", "a:1", "b:1"]).unwrap_or_default();
        assert_eq!(s.len(), 2);
        let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        assert_eq!(v, vec!["a:1", "b:1"]);
    }
}
