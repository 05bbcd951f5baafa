//! Format-versioned value encoding.
//!
//! Every value plinth writes to RocksDB starts with one byte, the format version, followed by the
//! JSON encoding of the value. A reader refuses versions newer than it knows instead of guessing,
//! so a downgrade after an upgrade fails loudly rather than corrupting state. Keys are binary
//! (big-endian integers, UTF-8 strings) and carry no version.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::StorageError;

/// The format version written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// Encodes `value` for the table named `table` (the name only feeds error messages).
pub fn encode<T>(table: &'static str, value: &T) -> Result<Vec<u8>, StorageError>
where
    T: Serialize + ?Sized,
{
    let mut out = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut out, value).map_err(|e| StorageError::Encode {
        table,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes a value written by [`encode`].
pub fn decode<T>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError>
where
    T: DeserializeOwned,
{
    let (&version, body) = bytes.split_first().ok_or(StorageError::Corrupt {
        table,
        reason: "empty value".into(),
    })?;
    if version == 0 || version > FORMAT_VERSION {
        return Err(StorageError::UnsupportedFormat {
            table,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_slice(body).map_err(|e| StorageError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// serde helpers that write byte strings as base64 text instead of JSON number arrays.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
    {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D>(d: D) -> Result<Vec<u8>, D::Error>
    where
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }

    /// The same for a list of byte strings.
    pub mod vec {
        use super::*;
        use serde::ser::SerializeSeq;

        pub fn serialize<S>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error>
        where
            S: Serializer,
        {
            let mut seq = s.serialize_seq(Some(items.len()))?;
            for item in items {
                seq.serialize_element(&STANDARD.encode(item))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D>(d: D) -> Result<Vec<Vec<u8>>, D::Error>
        where
            D: Deserializer<'de>,
        {
            let items = Vec::<String>::deserialize(d)?;
            items
                .into_iter()
                .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn round_trip_carries_version() {
        let bytes = encode("t", &vec![1u32, 2, 3]).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: Vec<u32> = decode("t", &bytes).unwrap();
        assert_eq!(back, vec![1, 2, 3]);
    }

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        let mut bytes = encode("t", &7u64).unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode::<u64>("t", &bytes),
            Err(StorageError::UnsupportedFormat { found, .. }) if found == FORMAT_VERSION + 1
        ));
        bytes[0] = 0;
        assert!(matches!(
            decode::<u64>("t", &bytes),
            Err(StorageError::UnsupportedFormat { .. })
        ));
        assert!(matches!(
            decode::<u64>("t", &[]),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<u64>("t", &[FORMAT_VERSION, b'x']),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
