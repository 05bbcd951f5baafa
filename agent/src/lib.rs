//! plinth-agent: node attestors, workload attestors, sync with the server, the SVID cache and
//! rotation, the SPIFFE Workload API, and the `plinth-agent` binary.
//!
//! Must not depend on: plinth-server, plinth-raft, plinth-storage (the agent talks to servers only
//! over the wire).
//!
//! The parts: the configuration ([`config`]), the data dir ([`store`]), connections to the
//! servers ([`conn`]), node attestation and agent SVID renewal ([`node`]), the sync with the
//! server that fills the [`cache::IdentityCache`] and rotates SVIDs ([`sync`]), which SVIDs
//! the cache holds ([`lru`]), the
//! [`jwt::JwtSvidSource`] JWT-SVIDs come through, workload attestation ([`attest`]), the
//! Workload API handlers ([`workload_api`]) and its Unix-socket endpoint ([`endpoint`]), the
//! agent's run loop ([`runtime`]), the admin socket with SPIRE's Debug API ([`admin`]), and the
//! client side used by `plinth-agent api ...`
//! ([`client`]).

pub mod admin;
pub mod attest;
pub mod cache;
pub mod client;
pub mod config;
pub mod conn;
pub mod endpoint;
pub mod h2_authority;
pub mod jwt;
pub mod lru;
pub mod node;
pub mod runtime;
pub mod store;
pub mod sync;
pub mod workload_api;
