//! The gRPC schema of blockmirror, package `blockmirror.v1`, and its
//! generated Rust code (messages, client stubs, server traits).
//!
//! Conversions to and from domain types live next to the code that needs
//! them (the server's `grpc` module and the client crate), not here.
#![forbid(unsafe_code)]

/// Generated code of package `blockmirror.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("blockmirror.v1");
}

/// Encoded descriptor set of every `.proto` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/blockmirror_descriptor.bin"));
