//! plinth-upstream: the `KeyManager` trait (memory, disk, PKCS#11) and the `UpstreamAuthority`
//! trait (disk, Vault PKI, AWS ACM PCA), with a conformance suite every implementation runs.
//!
//! Owns: every use of PKCS#11 (cryptoki) in plinth. Must not depend on: storage, raft, server,
//! agent. Private keys stay inside key managers; callers get [`plinth_spiffe::Signer`] handles.

pub mod authority;
pub mod conformance;
pub mod key_manager;

pub use authority::{DiskUpstreamAuthority, MintedCa, UpstreamAuthority, UpstreamError};
pub use key_manager::{DiskKeyManager, KeyManager, KeyManagerError, MemoryKeyManager};
