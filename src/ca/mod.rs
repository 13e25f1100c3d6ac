//! The certificate authority: key handling, the development PKI, CSR checks and the
//! certificate profiles. Knows rcgen and x509-parser; knows nothing of storage.

pub mod crl;
pub mod csr;
pub mod ocsp;
pub mod pkcs11;
pub mod pki;
pub mod profile;
pub mod signer;
pub mod sm2;
pub mod upstream;

pub use crl::{build_crl, CrlEntry};
pub use csr::{parse_device_csr, DevicePublicKey, MAX_CSR_BYTES};
pub use ocsp::{OcspResponder, OcspStatus, ParsedOcspRequest};
pub use pkcs11::Pkcs11Signer;
pub use pki::{init_dev_pki, CaMaterial, PkiFiles, Sm2Material};
pub use profile::{
    issue_client_certificate, issue_device_certificate, issue_sm2_device_certificate,
    DeviceCertificate, DeviceProfile, SubscriberRef,
};
pub use signer::{CaSigner, KeyFileSigner};

/// Role names carried in client certificates as a URI SAN `urn:payra:role:<name>`.
pub const ROLE_URI_PREFIX: &str = "urn:payra:role:";
