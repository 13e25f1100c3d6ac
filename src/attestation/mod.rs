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
pub mod chain;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
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

/// Where the status list comes from: a file re-read when it changes (looked at, at most,
/// every [`StatusSource::RECHECK`]), or a fixed list.
///
/// One caller at a time looks at the file, without holding the lock: the others go on with
/// the list they have. A file's identity is its modification time and length; a file
/// modified within the last two seconds is looked at again next time, so that a second write
/// within one tick of a coarse clock is not missed.
#[derive(Debug)]
pub struct StatusSource {
    path: Option<PathBuf>,
    state: std::sync::RwLock<StatusState>,
    looking: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct StatusState {
    list: std::sync::Arc<StatusList>,
    /// (modification time, length) of the file the list came from; `None` to read it again.
    stamp: Option<(std::time::SystemTime, u64)>,
    checked: std::time::Instant,
}

type Stamp = Option<(std::time::SystemTime, u64)>;

impl StatusSource {
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

    fn with(path: Option<PathBuf>, list: StatusList, stamp: Stamp) -> StatusSource {
        StatusSource {
            path,
            state: std::sync::RwLock::new(StatusState {
                list: std::sync::Arc::new(list),
                stamp,
                checked: std::time::Instant::now(),
            }),
            looking: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn fixed(list: StatusList) -> StatusSource {
        Self::with(None, list, None)
    }

    /// Reads `path`; an unreadable or invalid file is an error here (at start).
    pub fn file(path: &std::path::Path) -> Result<StatusSource> {
        let (list, stamp) = Self::read(path).map_err(|e| {
            Error::invalid(
                "attestation.android_status_file",
                format!("{}: {e}", path.display()),
            )
        })?;
        tracing::info!(path = %path.display(), entries = list.len(), "attestation status list loaded");
        Ok(Self::with(Some(path.to_path_buf()), list, stamp))
    }

    /// The file's stamp, `None` when it changed too recently to tell a later write apart.
    fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        let modified = meta.modified()?;
        let settled = modified
            .elapsed()
            .is_ok_and(|age| age > std::time::Duration::from_secs(2));
        Ok(settled.then_some((modified, meta.len())))
    }

    fn read(path: &std::path::Path) -> std::result::Result<(StatusList, Stamp), String> {
        // The stamp first: a write after it makes the next look read again.
        let stamp = Self::stamp(path).map_err(|e| e.to_string())?;
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        Ok((StatusList::parse(&text)?, stamp))
    }

    /// The list now, re-read first when the file changed.
    pub fn current(&self) -> std::sync::Arc<StatusList> {
        self.current_within(Self::RECHECK)
    }

    /// [`StatusSource::current`], looking at the file if it was last looked at `recheck` ago.
    pub fn current_within(&self, recheck: std::time::Duration) -> std::sync::Arc<StatusList> {
        use crate::sync::Unpoisoned;
        use std::sync::atomic::Ordering;
        let (list, stamp) = {
            let state = self.state.read().unpoisoned();
            if self.path.is_none() || state.checked.elapsed() < recheck {
                return state.list.clone();
            }
            (state.list.clone(), state.stamp)
        };
        let (Some(path), false) = (&self.path, self.looking.swap(true, Ordering::AcqRel)) else {
            return list;
        };
        let fresh = match Self::stamp(path) {
            Ok(now) if now.is_some() && now == stamp => None,
            Ok(_) => match Self::read(path) {
                Ok(read) => Some(read),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "attestation status list unreadable; keeping the last one read");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "attestation status list file is gone or unreadable; keeping the last one read");
                None
            }
        };
        let mut state = self.state.write().unpoisoned();
        state.checked = std::time::Instant::now();
        if let Some((list, stamp)) = fresh {
            tracing::info!(path = %path.display(), entries = list.len(), "attestation status list reloaded");
            state.list = std::sync::Arc::new(list);
            state.stamp = stamp;
        }
        let list = state.list.clone();
        drop(state);
        self.looking.store(false, Ordering::Release);
        list
    }
}

/// The status list: lowercase hex serial → status (`REVOKED`, `SUSPENDED`).
#[derive(Debug, Clone, Default)]
pub struct StatusList(HashMap<String, String>);

impl StatusList {
    /// Parses Google's JSON status format: `{"entries": {"<hex serial>": {"status": ...}}}`.
    pub fn parse(text: &[u8]) -> std::result::Result<StatusList, String> {
        #[derive(Deserialize)]
        struct Entry {
            status: String,
        }
        #[derive(Deserialize)]
        struct File {
            entries: HashMap<String, Entry>,
        }
        let file: File = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        Ok(StatusList(
            file.entries
                .into_iter()
                .map(|(serial, entry)| (chain::normalise_status_key(&serial), entry.status))
                .collect(),
        ))
    }

    pub fn get(&self, serial_hex: &str) -> Option<&str> {
        self.0.get(serial_hex).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const GOOGLE_ROOTS: &[(&str, &str)] = &[
    (
        "google-hardware-rsa-root",
        include_str!("roots/google-hardware-rsa-root-f1c172a699eaf51d.pem"),
    ),
    (
        "google-hardware-ec-ca1",
        include_str!("roots/google-hardware-ec-root-ca1.pem"),
    ),
];
const APPLE_ROOT: &str = include_str!("roots/apple-app-attestation-root-ca.pem");

/// SHA-256 of the SubjectPublicKeyInfo of AOSP's software attestation roots (EC and RSA)
/// and of its EC software attestation intermediate, whose private keys are published: a
/// chain through any of them proves a software key at most.
const AOSP_SOFTWARE_KEYS: &[&str] = &[
    "d5100c7942ef2e8310dc30ef82729680cf48d690735c3f68179a33c7c370f286",
    "f2c4746f545946c100e72297f8f946344d7052f03a2f694221f9c893b0e6f711",
    "f7d20ab04f01da6cbb6d1e3d9d00cd28495cb6f9a27ec85cf3e3e872d7c35878",
];

fn is_aosp_software_key(spki_der: &[u8]) -> bool {
    AOSP_SOFTWARE_KEYS.contains(&hex::encode(Sha256::digest(spki_der)).as_str())
}

/// The status-list keys of a verified chain's certificates below the anchor.
fn chain_serials(
    chain: &[x509_parser::certificate::X509Certificate<'_>],
    anchor: &TrustAnchor,
) -> Vec<String> {
    chain
        .iter()
        .filter(|c| c.public_key().raw != anchor.spki_der.as_slice())
        .map(chain::status_key)
        .collect()
}

/// Checks attestations against the configuration.
#[derive(Debug, Clone, Default)]
pub struct Attestor {
    pub android_anchors: Vec<TrustAnchor>,
    pub apple_anchors: Vec<TrustAnchor>,
    pub status: Option<std::sync::Arc<StatusSource>>,
    pub android_packages: Vec<String>,
    pub android_signing_digests: Vec<Vec<u8>>,
    pub apple_app_ids: Vec<String>,
    pub apple_development: bool,
    pub policy: AttestationPolicy,
    pub below_policy: BelowPolicy,
}

fn read_file(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::invalid(what, format!("{}: {e}", path.display())))
}

impl Attestor {
    /// Loads the anchors and the status list the configuration names.
    pub fn from_config(config: &AttestationConfig) -> Result<Attestor> {
        config.validate()?;
        let mut android_anchors = Vec::new();
        if config.google_roots {
            for (name, pem) in GOOGLE_ROOTS {
                android_anchors
                    .extend(TrustAnchor::from_pem(name, pem.as_bytes()).map_err(Error::internal)?);
            }
        }
        for path in &config.android_roots {
            let text = read_file(path, "attestation.android_roots")?;
            for anchor in TrustAnchor::from_pem(&path.display().to_string(), &text)
                .map_err(|e| Error::invalid("attestation.android_roots", e))?
            {
                if is_aosp_software_key(&anchor.spki_der) {
                    return Err(Error::invalid(
                        "attestation.android_roots",
                        format!(
                            "{} is AOSP's software attestation root, whose private key is \
                             public: list it under android_software_roots, where a chain to \
                             it counts as software only",
                            path.display()
                        ),
                    ));
                }
                android_anchors.push(anchor);
            }
        }
        for path in &config.android_software_roots {
            let text = read_file(path, "attestation.android_software_roots")?;
            for mut anchor in TrustAnchor::from_pem(&path.display().to_string(), &text)
                .map_err(|e| Error::invalid("attestation.android_software_roots", e))?
            {
                if let Some(other) = android_anchors
                    .iter()
                    .find(|a| !a.software_only && a.spki_der == anchor.spki_der)
                {
                    return Err(Error::invalid(
                        "attestation.android_software_roots",
                        format!(
                            "{}'s key is also trusted for hardware (as {}); list it in one place",
                            path.display(),
                            other.name
                        ),
                    ));
                }
                anchor.software_only = true;
                android_anchors.push(anchor);
            }
        }
        let apple_anchors = match &config.apple_root {
            Some(path) => {
                let text = read_file(path, "attestation.apple_root")?;
                TrustAnchor::from_pem(&path.display().to_string(), &text)
                    .map_err(|e| Error::invalid("attestation.apple_root", e))?
            }
            None => TrustAnchor::from_pem("apple-app-attestation-root", APPLE_ROOT.as_bytes())
                .map_err(Error::internal)?,
        };
        let status = match &config.android_status_file {
            Some(path) => Some(std::sync::Arc::new(StatusSource::file(path)?)),
            None => {
                if config.tier_a >= Requirement::Hardware {
                    tracing::warn!(
                        "[attestation] tier_a requires hardware but no android_status_file is \
                         set: attestation keys Google has revoked (leaked keyboxes) are not \
                         refused"
                    );
                }
                None
            }
        };
        Ok(Attestor {
            android_anchors,
            apple_anchors,
            status,
            android_packages: config.android_packages.clone(),
            android_signing_digests: config
                .android_signing_digests
                .iter()
                .filter_map(|d| hex::decode(d).ok())
                .collect(),
            apple_app_ids: config.apple_app_ids.clone(),
            apple_development: config.apple_development,
            policy: AttestationPolicy::of(config),
            below_policy: config.below_policy,
        })
    }

    /// Checks an Android chain whose KeyDescription must carry `challenge` and attest the
    /// key `key_point` (an uncompressed P-256 point).
    pub fn android(
        &self,
        chain_der: &[Vec<u8>],
        challenge: &[u8],
        key_point: &[u8],
        now_s: i64,
    ) -> std::result::Result<Attestation, AttestationRefusal> {
        let chain = chain::parse(chain_der)?;
        if chain.len() < 2 {
            return Err(AttestationRefusal::Malformed(
                "an Android attestation chain holds the leaf and at least its issuer".into(),
            ));
        }
        let description = android::key_description(&chain)?;
        let status = self.status.as_ref().map(|s| s.current());
        let anchor = chain::verify(&chain, &self.android_anchors, now_s, status.as_deref())?;
        if description.challenge != challenge {
            return Err(AttestationRefusal::WrongChallenge(format!(
                "the attestation's challenge is {} bytes {}…, not this enrollment's \
                 (SHA-256 of \"payra attestation challenge v1\\0\" and the token)",
                description.challenge.len(),
                hex::encode(&description.challenge[..description.challenge.len().min(8)])
            )));
        }
        let leaf = chain[0].public_key();
        let leaf_p256 = leaf
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
        if !leaf_p256 || leaf.subject_public_key.data.as_ref() != key_point {
            return Err(AttestationRefusal::KeyMismatch(
                "the attestation chain's leaf certifies another key than the CSR's".into(),
            ));
        }
        description.check_key_properties()?;
        if !self.android_packages.is_empty()
            && !description
                .packages
                .iter()
                .any(|p| self.android_packages.contains(p))
        {
            return Err(AttestationRefusal::UnknownApp(format!(
                "packages {:?} are not among [attestation] android_packages",
                description.packages
            )));
        }
        if !self.android_signing_digests.is_empty()
            && !description
                .signature_digests
                .iter()
                .any(|d| self.android_signing_digests.contains(d))
        {
            return Err(AttestationRefusal::UnknownApp(
                "the app's signing certificate is not among [attestation] \
                 android_signing_digests"
                    .into(),
            ));
        }
        // The weaker of what attested and what holds the key; software whatever it claims
        // under a root whose private key is public.
        let mut security_level = description
            .attestation_security_level
            .min(description.keymint_security_level);
        let mut root = description.root_of_trust.as_ref();
        let through_public_key = chain
            .iter()
            .any(|c| is_aosp_software_key(c.public_key().raw));
        if anchor.software_only || through_public_key {
            security_level = SecurityLevel::Software;
            root = None;
        }
        Ok(Attestation {
            platform: Platform::Android,
            security_level,
            boot_state: root.map(|r| r.verified_boot_state),
            device_locked: root.map(|r| r.device_locked),
            root: anchor.name.clone(),
            root_key_sha256: anchor.key_sha256_hex(),
            apps: description.packages,
            attested_at_s: now_s,
            chain_serials: chain_serials(&chain, anchor),
        })
    }

    /// Checks an App Attest object made with `client_data_hash`.
    pub fn apple(
        &self,
        object: &[u8],
        client_data_hash: &[u8; 32],
        now_s: i64,
    ) -> std::result::Result<Attestation, AttestationRefusal> {
        if self.apple_app_ids.is_empty() {
            return Err(AttestationRefusal::NotConfigured(
                "Apple App Attest is not accepted: [attestation] apple_app_ids is empty".into(),
            ));
        }
        let object = apple::decode(object)?;
        if object.x5c.len() != 2 {
            return Err(AttestationRefusal::Malformed(format!(
                "App Attest object: attStmt.x5c holds {} certificates, not 2 (the credential \
                 certificate and Apple's intermediate)",
                object.x5c.len()
            )));
        }
        let chain = chain::parse(&object.x5c)?;
        let anchor = chain::verify(&chain, &self.apple_anchors, now_s, None)?;
        let attested = apple::check(
            &object,
            &chain[0],
            client_data_hash,
            &self.apple_app_ids,
            self.apple_development,
        )?;
        Ok(Attestation {
            platform: Platform::Apple,
            security_level: SecurityLevel::SecureEnclave,
            boot_state: None,
            device_locked: None,
            root: anchor.name.clone(),
            root_key_sha256: anchor.key_sha256_hex(),
            apps: vec![attested.app_id],
            attested_at_s: now_s,
            chain_serials: chain_serials(&chain, anchor),
        })
    }

    /// Checks an enrollment's evidence (if any) for `token` and the CSR's key, then applies
    /// `below_policy`: returns the attestation to record, or the refusal.
    pub fn enrollment(
        &self,
        evidence: Option<&Evidence>,
        token: &str,
        key_point: &[u8],
        now_s: i64,
    ) -> std::result::Result<Option<Attestation>, AttestationRefusal> {
        let attestation = match evidence {
            None => None,
            Some(Evidence::Android { chain }) => {
                Some(self.android(chain, &challenge(token), key_point, now_s)?)
            }
            Some(Evidence::Apple { attestation_object }) => {
                let hash: [u8; 32] = Sha256::digest(apple_client_data(token, key_point)).into();
                Some(self.apple(attestation_object, &hash, now_s)?)
            }
        };
        if self.below_policy == BelowPolicy::Refuse {
            let class = attestation
                .as_ref()
                .map_or(AttestationClass::NONE, Attestation::class);
            self.policy
                .check(self.policy.tier_a, class)
                .map_err(AttestationRefusal::BelowPolicy)?;
        }
        Ok(attestation)
    }
}

#[cfg(test)]
mod tests;
