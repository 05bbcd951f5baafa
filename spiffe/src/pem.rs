//! PEM helpers: certificate chains and keys as text.

/// Why PEM text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("malformed PEM: {0}")]
    Malformed(String),
    #[error("no PEM block labelled {0:?} found")]
    NotFound(&'static str),
    #[error("expected one PEM block labelled {label:?}, found {found}")]
    Count { label: &'static str, found: usize },
}

/// Encodes one DER object as a PEM block with `label`.
pub fn encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Encodes a list of certificates as concatenated `CERTIFICATE` blocks.
pub fn encode_certs<D: AsRef<[u8]>>(certs: &[D]) -> String {
    certs
        .iter()
        .map(|c| encode("CERTIFICATE", c.as_ref()))
        .collect()
}

/// Every block labelled `label`, in order. Blocks with other labels are skipped.
pub fn parse_all(text: &str, label: &'static str) -> Result<Vec<Vec<u8>>, PemError> {
    let blocks = pem::parse_many(text).map_err(|e| PemError::Malformed(e.to_string()))?;
    let out: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == label)
        .map(|b| b.into_contents())
        .collect();
    if out.is_empty() {
        return Err(PemError::NotFound(label));
    }
    Ok(out)
}

/// Exactly one block labelled `label`.
pub fn parse_one(text: &str, label: &'static str) -> Result<Vec<u8>, PemError> {
    let mut all = parse_all(text, label)?;
    if all.len() != 1 {
        return Err(PemError::Count {
            label,
            found: all.len(),
        });
    }
    Ok(all.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let text = encode_certs(&[b"abc".to_vec(), b"def".to_vec()]);
        assert_eq!(
            parse_all(&text, "CERTIFICATE"),
            Ok(vec![b"abc".to_vec(), b"def".to_vec()])
        );
        assert!(matches!(
            parse_one(&text, "CERTIFICATE"),
            Err(PemError::Count { found: 2, .. })
        ));
        assert_eq!(
            parse_all(&text, "PRIVATE KEY"),
            Err(PemError::NotFound("PRIVATE KEY"))
        );
    }
}
