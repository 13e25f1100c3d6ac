//! What attestation each tier needs (`[attestation]` in the configuration), and what a
//! verified signature under a certificate counts for.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::AttestationClass;
use crate::error::{Error, Result};

/// What attestation a tier needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    /// Attested or not.
    #[default]
    None,
    /// Any valid attestation, software included.
    Any,
    /// A key in a TEE, a StrongBox, or bound by App Attest.
    Hardware,
    /// A key in an Android StrongBox.
    Strongbox,
}

impl Requirement {
    pub fn name(self) -> &'static str {
        match self {
            Requirement::None => "none",
            Requirement::Any => "any",
            Requirement::Hardware => "hardware",
            Requirement::Strongbox => "strongbox",
        }
    }

    pub fn parse(text: &str) -> Option<Requirement> {
        [
            Requirement::None,
            Requirement::Any,
            Requirement::Hardware,
            Requirement::Strongbox,
        ]
        .into_iter()
        .find(|r| r.name() == text)
    }
}

/// What a verified signature under a device certificate counts for in the tier engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateFactor {
    /// Not a factor (no verified signature, a QualifyTransaction, or below `tier_b`).
    NotCounted,
    /// A possession factor, but not the certificate tier A needs.
    Possession,
    /// The digital certificate of tier A (and a possession factor).
    Certificate,
}

impl CertificateFactor {
    pub fn name(self) -> &'static str {
        match self {
            CertificateFactor::NotCounted => "NOT_COUNTED",
            CertificateFactor::Possession => "POSSESSION",
            CertificateFactor::Certificate => "CERTIFICATE",
        }
    }
}

/// What to do with an enrollment whose attestation (or lack of one) does not meet `tier_a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BelowPolicy {
    /// Enroll it; its certificate does not count for tier A.
    #[default]
    Enroll,
    /// Refuse the enrollment (`FAILED_PRECONDITION`); the token stays usable.
    Refuse,
}

/// What an Apple App Attest enrollment counts as. App Attest proves the genuine app on a
/// genuine device asked for the payment key, not where that key is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AppleLevel {
    #[default]
    Hardware,
    Software,
}

/// `[attestation]` in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestationConfig {
    /// What the certificate needs to count as tier A's digital certificate.
    pub tier_a: Requirement,
    /// What it needs to count as a possession factor at all (toward tier B).
    pub tier_b: Requirement,
    /// Hardware levels count only when the device booted a verified, locked system.
    pub require_verified_boot: bool,
    /// An enrollment below `tier_a`: `enroll` (without tier-A eligibility) or `refuse`.
    pub below_policy: BelowPolicy,
    /// Trust Google's hardware attestation roots (shipped with payra).
    pub google_roots: bool,
    /// More Android roots: PEM files, e.g. a manufacturer's for phones without Google services.
    pub android_roots: Vec<PathBuf>,
    /// Android roots trusted for software-level attestation only (AOSP's software
    /// attestation roots, whose private keys are public): whatever a chain to one claims,
    /// it counts as software.
    pub android_software_roots: Vec<PathBuf>,
    /// Google's attestation status list (JSON, the format of
    /// https://android.googleapis.com/attestation/status), kept current by the operator.
    pub android_status_file: Option<PathBuf>,
    /// Android apps allowed to attest (package names); empty accepts any.
    pub android_packages: Vec<String>,
    /// SHA-256 digests (hex) of the signing certificates allowed; empty accepts any.
    pub android_signing_digests: Vec<String>,
    /// iOS apps allowed to attest, `<team id>.<bundle id>`. Empty refuses App Attest.
    pub apple_app_ids: Vec<String>,
    /// Accept App Attest's development environment (for test builds only).
    pub apple_development: bool,
    /// What an App Attest enrollment counts as: `hardware` or `software`.
    pub apple_level: AppleLevel,
    /// Apple's App Attestation root instead of the shipped one (PEM file).
    pub apple_root: Option<PathBuf>,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        AttestationConfig {
            tier_a: Requirement::None,
            tier_b: Requirement::None,
            require_verified_boot: true,
            below_policy: BelowPolicy::Enroll,
            google_roots: true,
            android_roots: Vec::new(),
            android_software_roots: Vec::new(),
            android_status_file: None,
            android_packages: Vec::new(),
            android_signing_digests: Vec::new(),
            apple_app_ids: Vec::new(),
            apple_development: false,
            apple_level: AppleLevel::Hardware,
            apple_root: None,
        }
    }
}

impl AttestationConfig {
    pub fn validate(&self) -> Result<()> {
        if self.tier_b > self.tier_a {
            return Err(Error::invalid(
                "attestation.tier_b",
                format!(
                    "{} is stricter than tier_a {}: a certificate good enough for tier A \
                     would not count toward tier B",
                    self.tier_b.name(),
                    self.tier_a.name()
                ),
            ));
        }
        if !self.android_packages.is_empty() && self.android_signing_digests.is_empty() {
            return Err(Error::invalid(
                "attestation.android_packages",
                "needs attestation.android_signing_digests too: any app can take a package \
                 name, only yours is signed with your key",
            ));
        }
        for digest in &self.android_signing_digests {
            if digest.len() != 64 || hex::decode(digest).is_err() {
                return Err(Error::invalid(
                    "attestation.android_signing_digests",
                    format!("{digest:?} is not 64 hex digits (a SHA-256)"),
                ));
            }
        }
        for id in &self.apple_app_ids {
            let valid = id.split_once('.').is_some_and(|(team, bundle)| {
                team.len() == 10
                    && team.chars().all(|c| c.is_ascii_alphanumeric())
                    && !bundle.is_empty()
            });
            if !valid {
                return Err(Error::invalid(
                    "attestation.apple_app_ids",
                    format!("{id:?} is not <10-character team id>.<bundle id>"),
                ));
            }
        }
        Ok(())
    }
}

/// The attestation policy applied at verification (from the configuration loaded at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestationPolicy {
    pub tier_a: Requirement,
    pub tier_b: Requirement,
    pub require_verified_boot: bool,
    /// App Attest counts as hardware; otherwise as software.
    pub app_attest_as_hardware: bool,
}

impl Default for AttestationPolicy {
    fn default() -> Self {
        AttestationPolicy {
            tier_a: Requirement::None,
            tier_b: Requirement::None,
            require_verified_boot: true,
            app_attest_as_hardware: true,
        }
    }
}

impl AttestationPolicy {
    pub fn of(config: &AttestationConfig) -> AttestationPolicy {
        AttestationPolicy {
            tier_a: config.tier_a,
            tier_b: config.tier_b,
            require_verified_boot: config.require_verified_boot,
            app_attest_as_hardware: config.apple_level == AppleLevel::Hardware,
        }
    }

    /// Whether `class` meets `requirement`; why not when it does not.
    pub fn check(
        &self,
        requirement: Requirement,
        class: AttestationClass,
    ) -> std::result::Result<(), String> {
        let need = match requirement {
            Requirement::None => return Ok(()),
            Requirement::Any => 0,
            Requirement::Hardware => 1,
            Requirement::Strongbox => 2,
        };
        let Some(mut rank) = class.rank() else {
            return Err(format!(
                "the device key was not attested at enrollment; {} attestation is required",
                requirement.name()
            ));
        };
        let mut level = class.describe();
        if class.app_attest() && !self.app_attest_as_hardware {
            rank = 0;
            level = "App Attest, which this server counts as software".into();
        }
        if rank < need {
            return Err(format!(
                "the device key's attestation is {level}; {} is required",
                requirement.name()
            ));
        }
        if need >= 1 && self.require_verified_boot && !class.boot_verified() {
            return Err(
                "the device did not boot a verified, locked system when its key was attested"
                    .into(),
            );
        }
        Ok(())
    }

    /// What a verified signature under a certificate of `class` counts for, and why it
    /// counts for less than tier A's certificate when it does.
    pub fn factor(&self, class: AttestationClass) -> (CertificateFactor, Option<String>) {
        match self.check(self.tier_a, class) {
            Ok(()) => (CertificateFactor::Certificate, None),
            Err(why_not_a) => match self.check(self.tier_b, class) {
                Ok(()) => (
                    CertificateFactor::Possession,
                    Some(format!("not counted as tier A's certificate: {why_not_a}")),
                ),
                Err(why_not_b) => (
                    CertificateFactor::NotCounted,
                    Some(format!("not counted as a factor: {why_not_b}")),
                ),
            },
        }
    }
}
