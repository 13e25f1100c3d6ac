//! The gRPC edge: generated protobuf types, proto ⇄ domain conversion, status mapping,
//! roles from client certificates, and the tonic services. Only this module knows tonic and
//! prost types.

pub mod auth;
mod convert;
pub mod observe;
mod services;
mod status;

pub use services::{AdminService, EnrollmentService, RegistrationService, VerificationService};

/// Generated protobuf and gRPC code for package `payra.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("payra.v1");

    /// The encoded `FileDescriptorSet` of payra's protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/payra_descriptor.bin"));
}
