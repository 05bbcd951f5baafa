//! plinth-server: the CA manager and rotation, registration and authorization, node-attestation
//! verifiers, the gRPC APIs, the federation bundle endpoint and client, configuration, and the
//! `plinth-server` binary.
//!
//! Owns: the server process. Nothing in plinth depends on it. Domain code here speaks
//! plinth-spiffe and plinth-storage types; protobuf types stay in the gRPC handlers.

pub mod api;
pub mod attest;
pub mod authz;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod health;
pub mod peer;
pub mod run;
pub mod state;
pub mod tls;
