//! plinth-agent: node attestors, workload attestors, sync with the server, the SVID cache and
//! rotation, the SPIFFE Workload API, and the `plinth-agent` binary.
//!
//! Must not depend on: plinth-server, plinth-raft, plinth-storage (the agent talks to servers only
//! over the wire).
//!
//! What is here so far: the [`cache::IdentityCache`] the Workload API serves from (the sync with
//! the server fills it), the [`jwt::JwtSvidSource`] the agent mints JWT-SVIDs through, workload
//! attestation ([`attest`]), the Workload API handlers ([`workload_api`]) and its Unix-socket
//! endpoint ([`endpoint`]), and the client side used by `plinth-agent api ...` ([`client`]).

pub mod attest;
pub mod cache;
pub mod client;
pub mod endpoint;
pub mod h2_authority;
pub mod jwt;
pub mod workload_api;
