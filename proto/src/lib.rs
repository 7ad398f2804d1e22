//! hotfleet's contracts: the gRPC services between CLI, coordinator and agents
//! (`hotfleet/v1/*.proto`), and the messages of the local agent <-> runtime
//! protocol, which travel as length-prefixed proto3 JSON (see [`local`]).
//!
//! Next to the contracts sit the pieces every binary shares to speak them, so
//! the CLI, agent and coordinator cannot disagree:
//! - wire formats: [`local`] (framing), [`parts`] (sources in pieces),
//!   [`digests`] (the fingerprint naming a map of module digests),
//!   [`duration`] (the duration syntax), [`address`] (what a peer address dials);
//! - transport: [`tls`] (the TLS flags, server and client configs, who a
//!   certificate names), [`listener`] (connection cap and handshake deadline),
//!   [`gate`] (the one tower layer that admits or refuses each request),
//!   [`pushback`] (a busy coordinator's "come back in N ms").

pub mod address;
pub mod attach;
pub mod codec;
pub mod digests;
pub mod duration;
pub mod gate;
pub mod listener;
pub mod local;
pub mod parts;
pub mod pushback;
pub mod tls;

/// Generated code for package `hotfleet.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/hotfleet.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/hotfleet.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of every hotfleet proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hotfleet_descriptor.bin"));

/// Version of the local runtime protocol (`runtime.proto`). A runtime that says
/// another version in its `hello` is refused with a clear error. Version 2:
/// module sources travel as `source_part` frames (see [`parts`]).
pub const RUNTIME_PROTOCOL_VERSION: u32 = 2;
