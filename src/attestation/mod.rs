//! Device key attestation at enrollment: proof that the payment key lives in the phone's
//! secure hardware (Android Key Attestation), or that the genuine app on a genuine iPhone
//! vouches for it (Apple App Attest), and the policy that decides what a certificate counts
//! for in the tier engine.
//!
//! - [`challenge`]: what the app puts into its attestation, derived from its enrollment token,
//!   so an attestation made for one enrollment cannot be replayed into another.
//! - [`Attestor`]: the configured trust anchors, status list and app ids; checks an
//!   [`Evidence`] against an enrollment and returns the [`Attestation`] the certificate
//!   record keeps.
//! - [`AttestationPolicy`]: per tier, what attestation the certificate needs to count.
//!
//! docs/attestation.md is the reference for SDK authors and operators.

pub mod android;
pub mod apple;
mod attestor;
pub mod chain;
mod policy;
mod status;

pub use attestor::Attestor;
pub use policy::{
    AppleLevel, AttestationConfig, AttestationPolicy, BelowPolicy, CertificateFactor, Requirement,
};
pub use status::{StatusList, StatusSource};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use chain::TrustAnchor;

/// The domain separator of an enrollment's attestation challenge.
const CHALLENGE_CONTEXT: &[u8] = b"payra attestation challenge v1\0";

/// The attestation challenge of the enrollment that uses `token`:
/// `SHA-256("payra attestation challenge v1\0" || token)`, the token as the UTF-8 text the
/// app received. The app computes it itself; no round trip is needed.
pub fn challenge(token: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(CHALLENGE_CONTEXT);
    hash.update(token.as_bytes());
    hash.finalize().into()
}

/// The client data an iOS app hashes for `attestKey(_:clientDataHash:)`: the enrollment's
/// challenge followed by SHA-256 of the payment key's uncompressed P-256 point (65 bytes,
/// the CSR's key). Its SHA-256 is the `clientDataHash`.
pub fn apple_client_data(token: &str, payment_key_point: &[u8]) -> Vec<u8> {
    let mut data = challenge(token).to_vec();
    data.extend_from_slice(&Sha256::digest(payment_key_point));
    data
}

/// Where the attested key is kept, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityLevel {
    /// Android Keystore's software implementation: the key is in the OS, copyable when rooted.
    Software,
    /// Android's Trusted Execution Environment.
    TrustedEnvironment,
    /// Apple's Secure Enclave (App Attest's key; the payment key is bound to it).
    SecureEnclave,
    /// Android StrongBox: a separate secure element.
    StrongBox,
}

impl SecurityLevel {
    pub fn name(self) -> &'static str {
        match self {
            SecurityLevel::Software => "software",
            SecurityLevel::TrustedEnvironment => "tee",
            SecurityLevel::SecureEnclave => "secure_enclave",
            SecurityLevel::StrongBox => "strongbox",
        }
    }
}

/// Android's verifiedBootState.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootState {
    Verified,
    SelfSigned,
    Unverified,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Android,
    Apple,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Android => "android",
            Platform::Apple => "apple",
        }
    }
}

impl BootState {
    pub fn name(self) -> &'static str {
        match self {
            BootState::Verified => "verified",
            BootState::SelfSigned => "self_signed",
            BootState::Unverified => "unverified",
            BootState::Failed => "failed",
        }
    }
}

/// What an enrollment's attestation proved; kept in the certificate record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    pub platform: Platform,
    pub security_level: SecurityLevel,
    /// Android: the verified-boot state and whether the bootloader is locked. Apple: `None`
    /// (App Attest runs only on a genuine, unmodified iOS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_state: Option<BootState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_locked: Option<bool>,
    /// The trust anchor the chain ended at, and SHA-256 of its public key, hex.
    pub root: String,
    pub root_key_sha256: String,
    /// Android: the attesting app's package names; Apple: `<team id>.<bundle id>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    pub attested_at_s: i64,
    /// The serials of the chain's certificates below the anchor, as the status list keys
    /// them: to find what a later-revoked attestation certificate vouched for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain_serials: Vec<String>,
}

impl Attestation {
    /// Whether the device booted a verified, locked system (Apple: always).
    pub fn boot_verified(&self) -> bool {
        match self.platform {
            Platform::Apple => true,
            Platform::Android => {
                self.boot_state == Some(BootState::Verified) && self.device_locked == Some(true)
            }
        }
    }

    /// The one byte the verification cache and the summaries keep.
    pub fn class(&self) -> AttestationClass {
        AttestationClass::new(Some(self.security_level), self.boot_verified())
    }
}

/// An attestation in one byte: 0 for none; else bit 7 set, the level in bits 0-1
/// (software, hardware, StrongBox), bit 2 for a verified boot, bit 3 for Apple App Attest
/// (hardware only while the policy counts App Attest as hardware).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct AttestationClass(pub u8);

impl AttestationClass {
    pub const NONE: AttestationClass = AttestationClass(0);

    pub fn new(level: Option<SecurityLevel>, boot_verified: bool) -> AttestationClass {
        let Some(level) = level else {
            return AttestationClass::NONE;
        };
        let rank = match level {
            SecurityLevel::Software => 0,
            SecurityLevel::TrustedEnvironment | SecurityLevel::SecureEnclave => 1,
            SecurityLevel::StrongBox => 2,
        };
        let app_attest = if level == SecurityLevel::SecureEnclave {
            0x08
        } else {
            0
        };
        AttestationClass(0x80 | rank | app_attest | if boot_verified { 0x04 } else { 0 })
    }

    /// Whether this is an Apple App Attest enrollment.
    pub fn app_attest(self) -> bool {
        self.0 & 0x88 == 0x88
    }

    /// `None` when the certificate's key was not attested; else 0 software, 1 hardware
    /// (TEE or Secure Enclave), 2 StrongBox.
    pub fn rank(self) -> Option<u8> {
        (self.0 & 0x80 != 0).then_some(self.0 & 0x03)
    }

    pub fn boot_verified(self) -> bool {
        self.0 & 0x04 != 0
    }

    /// A short name: `none`, `software`, `hardware`, `strongbox` (with `, boot not verified`).
    pub fn describe(self) -> String {
        let level = match self.rank() {
            None => return "none".into(),
            Some(0) => "software",
            Some(1) => "hardware",
            Some(_) => "strongbox",
        };
        if self.boot_verified() || level == "software" {
            level.to_string()
        } else {
            format!("{level}, boot not verified")
        }
    }
}

/// A filter on the attestation class, for listing certificates: exactly this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestationFilter {
    None,
    Software,
    Hardware,
    Strongbox,
}

impl AttestationFilter {
    pub const NAMES: &'static str = "none, software, hardware, strongbox";

    pub fn parse(text: &str) -> Option<AttestationFilter> {
        match text {
            "none" => Some(AttestationFilter::None),
            "software" => Some(AttestationFilter::Software),
            "hardware" => Some(AttestationFilter::Hardware),
            "strongbox" => Some(AttestationFilter::Strongbox),
            _ => Option::None,
        }
    }

    pub fn matches(self, class: AttestationClass) -> bool {
        let rank = match self {
            AttestationFilter::None => Option::None,
            AttestationFilter::Software => Some(0),
            AttestationFilter::Hardware => Some(1),
            AttestationFilter::Strongbox => Some(2),
        };
        class.rank() == rank
    }
}

/// Why an attestation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationRefusal {
    #[error("attestation is malformed: {0}")]
    Malformed(String),
    #[error("attestation chain does not verify: {0}")]
    BadChain(String),
    #[error("attestation chain ends at {0}, which is not a configured trust anchor")]
    UnknownRoot(String),
    #[error("attestation certificate {serial} is {status} in the attestation status list")]
    Revoked { serial: String, status: String },
    #[error("attestation certificate expired or not yet valid: {0}")]
    Expired(String),
    #[error("attestation challenge does not match this enrollment: {0}")]
    WrongChallenge(String),
    #[error("attested key is not the CSR's key: {0}")]
    KeyMismatch(String),
    #[error("attested key does not qualify: {0}")]
    KeyProperties(String),
    #[error("attesting app is not allowed: {0}")]
    UnknownApp(String),
    #[error("{0}")]
    NotConfigured(String),
    #[error("enrollment refused by the attestation policy: {0}")]
    BelowPolicy(String),
}

/// The evidence an enrollment may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// Android Key Attestation: the chain from `KeyStore.getCertificateChain`, leaf first.
    Android { chain: Vec<Vec<u8>> },
    /// Apple App Attest: the attestation object `attestKey` returned.
    Apple { attestation_object: Vec<u8> },
}

#[cfg(test)]
mod tests;
