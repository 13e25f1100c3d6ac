//! [`Attestor`]: the configured trust anchors, status list and app ids, and the checks of an
//! enrollment's evidence against them.

use sha2::{Digest, Sha256};

use super::policy::{
    AttestationConfig, AttestationPolicy, BelowPolicy, CertificateFactor, Requirement,
};
use super::{
    android, apple, apple_client_data, chain, challenge, Attestation, AttestationClass,
    AttestationRefusal, Evidence, Platform, SecurityLevel, StatusSource, TrustAnchor,
};
use crate::error::{Error, Result};

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

pub(super) fn is_aosp_software_key(spki_der: &[u8]) -> bool {
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
    /// What a certificate of each attestation class counts for under `policy`, worked out
    /// once: a verification looks its class up instead of formatting why.
    factors: Vec<(CertificateFactor, Option<std::sync::Arc<str>>)>,
}

/// [`AttestationPolicy::factor`] for every class byte.
fn factor_table(
    policy: &AttestationPolicy,
) -> Vec<(CertificateFactor, Option<std::sync::Arc<str>>)> {
    (0..=u8::MAX)
        .map(|byte| {
            let (factor, note) = policy.factor(AttestationClass(byte));
            (factor, note.map(std::sync::Arc::from))
        })
        .collect()
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
            factors: factor_table(&AttestationPolicy::of(config)),
        })
    }

    /// What a verified signature under a certificate of `class` counts for, and why less
    /// than tier A's certificate when it does (a table lookup).
    pub fn factor(
        &self,
        class: AttestationClass,
    ) -> (CertificateFactor, Option<std::sync::Arc<str>>) {
        match self.factors.get(usize::from(class.0)) {
            Some(entry) => entry.clone(),
            // An Attestor not made from a configuration (tests): work it out.
            None => {
                let (factor, note) = self.policy.factor(class);
                (factor, note.map(std::sync::Arc::from))
            }
        }
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
