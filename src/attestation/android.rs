//! Android Key Attestation: the KeyDescription extension (OID 1.3.6.1.4.1.11129.2.1.17) of
//! the leaf of a Keystore attestation chain, as the Android documentation's schema gives it
//! (attestation versions 1 to 400 share the fields read here).
//!
//! ```text
//! KeyDescription ::= SEQUENCE {
//!     attestationVersion INTEGER, attestationSecurityLevel SecurityLevel,
//!     keyMintVersion INTEGER, keyMintSecurityLevel SecurityLevel,
//!     attestationChallenge OCTET STRING, uniqueId OCTET STRING,
//!     softwareEnforced AuthorizationList, hardwareEnforced AuthorizationList }
//! AuthorizationList ::= SEQUENCE { purpose [1] EXPLICIT SET OF INTEGER OPTIONAL,
//!     origin [702] EXPLICIT INTEGER OPTIONAL, rootOfTrust [704] EXPLICIT RootOfTrust OPTIONAL,
//!     attestationApplicationId [709] EXPLICIT OCTET STRING OPTIONAL, ... }
//! RootOfTrust ::= SEQUENCE { verifiedBootKey OCTET STRING, deviceLocked BOOLEAN,
//!     verifiedBootState ENUMERATED, verifiedBootHash OCTET STRING (version 3 on) }
//! ```

use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::Oid;

use super::{AttestationRefusal, BootState, SecurityLevel};

/// The KeyDescription extension's OID.
pub const KEY_DESCRIPTION_OID: &str = "1.3.6.1.4.1.11129.2.1.17";

/// `purpose` value SIGN (KeyMint `KeyPurpose::SIGN`).
const PURPOSE_SIGN: i64 = 2;
/// `origin` value GENERATED: made inside the secure hardware, never imported.
const ORIGIN_GENERATED: i64 = 0;

/// What payra reads from a KeyDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDescription {
    pub attestation_version: i64,
    pub attestation_security_level: SecurityLevel,
    pub keymint_security_level: SecurityLevel,
    pub challenge: Vec<u8>,
    /// From the list the attestation's security level enforces.
    pub purposes: Vec<i64>,
    pub origin: Option<i64>,
    /// `None` when the hardware list has no rootOfTrust (software attestation).
    pub root_of_trust: Option<RootOfTrust>,
    /// Package names and signing-certificate SHA-256 digests, from `softwareEnforced`.
    pub packages: Vec<String>,
    pub signature_digests: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootOfTrust {
    pub device_locked: bool,
    pub verified_boot_state: BootState,
}

impl KeyDescription {
    /// Whether the key may sign and was generated in the attesting hardware.
    pub fn check_key_properties(&self) -> Result<(), AttestationRefusal> {
        if !self.purposes.contains(&PURPOSE_SIGN) {
            return Err(AttestationRefusal::KeyProperties(format!(
                "the attested key's purposes {:?} do not include SIGN (2)",
                self.purposes
            )));
        }
        if self.origin != Some(ORIGIN_GENERATED) {
            return Err(AttestationRefusal::KeyProperties(match self.origin {
                Some(origin) => format!(
                    "the attested key's origin is {origin}, not GENERATED (0): it was \
                     imported, not made in the secure hardware"
                ),
                None => "the attestation does not say where the key was made (no origin)".into(),
            }));
        }
        Ok(())
    }
}

fn malformed(what: impl std::fmt::Display) -> AttestationRefusal {
    AttestationRefusal::Malformed(format!("KeyDescription: {what}"))
}

/// Reads one DER element from the front of `input`.
fn element(input: &[u8]) -> Result<(Any<'_>, &[u8]), AttestationRefusal> {
    let (rest, any) = Any::from_der(input).map_err(|e| malformed(format!("bad DER: {e}")))?;
    Ok((any, rest))
}

/// The elements of a constructed value's contents.
fn elements(mut data: &[u8]) -> Result<Vec<Any<'_>>, AttestationRefusal> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if out.len() > 256 {
            return Err(malformed("more than 256 elements"));
        }
        let (any, rest) = element(data)?;
        out.push(any);
        data = rest;
    }
    Ok(out)
}

fn expect_universal<'a>(
    any: &Any<'a>,
    tag: Tag,
    what: &str,
) -> Result<&'a [u8], AttestationRefusal> {
    if any.header.class() != Class::Universal || any.header.tag() != tag {
        return Err(malformed(format!("{what} has the wrong type")));
    }
    Ok(any.data)
}

/// A DER INTEGER or ENUMERATED of at most 8 content bytes.
fn integer(any: &Any<'_>, what: &str) -> Result<i64, AttestationRefusal> {
    let tag = any.header.tag();
    if any.header.class() != Class::Universal || (tag != Tag::Integer && tag != Tag::Enumerated) {
        return Err(malformed(format!("{what} is not an integer")));
    }
    let bytes = any.data;
    if bytes.is_empty() || bytes.len() > 8 {
        return Err(malformed(format!(
            "{what} has {} content bytes",
            bytes.len()
        )));
    }
    let mut value: i64 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
    for &b in bytes {
        value = (value << 8) | i64::from(b);
    }
    Ok(value)
}

fn security_level(any: &Any<'_>, what: &str) -> Result<SecurityLevel, AttestationRefusal> {
    match integer(any, what)? {
        0 => Ok(SecurityLevel::Software),
        1 => Ok(SecurityLevel::TrustedEnvironment),
        2 => Ok(SecurityLevel::StrongBox),
        other => Err(malformed(format!(
            "{what} {other} is not a known security level"
        ))),
    }
}

/// One AuthorizationList: its tagged entries by tag number.
struct AuthorizationList<'a>(Vec<(u32, Any<'a>)>);

impl<'a> AuthorizationList<'a> {
    fn parse(any: &Any<'a>, what: &str) -> Result<Self, AttestationRefusal> {
        let data = expect_universal(any, Tag::Sequence, what)?;
        let mut entries = Vec::new();
        for entry in elements(data)? {
            if entry.header.class() != Class::ContextSpecific || !entry.header.is_constructed() {
                return Err(malformed(format!(
                    "{what} holds an entry that is not [n] EXPLICIT"
                )));
            }
            let (inner, rest) = element(entry.data)?;
            if !rest.is_empty() {
                return Err(malformed(format!(
                    "{what} [{}] holds two values",
                    entry.header.tag().0
                )));
            }
            entries.push((entry.header.tag().0, inner));
        }
        Ok(AuthorizationList(entries))
    }

    fn get(&self, tag: u32) -> Option<&Any<'a>> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, any)| any)
    }

    fn purposes(&self) -> Result<Vec<i64>, AttestationRefusal> {
        let Some(set) = self.get(1) else {
            return Ok(Vec::new());
        };
        let data = expect_universal(set, Tag::Set, "purpose")?;
        elements(data)?
            .iter()
            .map(|p| integer(p, "purpose"))
            .collect()
    }

    fn origin(&self) -> Result<Option<i64>, AttestationRefusal> {
        self.get(702).map(|o| integer(o, "origin")).transpose()
    }

    fn root_of_trust(&self) -> Result<Option<RootOfTrust>, AttestationRefusal> {
        let Some(root) = self.get(704) else {
            return Ok(None);
        };
        let fields = elements(expect_universal(root, Tag::Sequence, "rootOfTrust")?)?;
        if fields.len() < 3 {
            return Err(malformed("rootOfTrust has fewer than three fields"));
        }
        expect_universal(&fields[0], Tag::OctetString, "verifiedBootKey")?;
        let locked = expect_universal(&fields[1], Tag::Boolean, "deviceLocked")?;
        // DER says TRUE is 0xFF; some keymasters write BER's any-nonzero.
        let device_locked = match locked {
            [0x00] => false,
            [_] => true,
            _ => return Err(malformed("deviceLocked is not a BOOLEAN")),
        };
        let verified_boot_state = match integer(&fields[2], "verifiedBootState")? {
            0 => BootState::Verified,
            1 => BootState::SelfSigned,
            2 => BootState::Unverified,
            3 => BootState::Failed,
            other => return Err(malformed(format!("verifiedBootState {other} is unknown"))),
        };
        Ok(Some(RootOfTrust {
            device_locked,
            verified_boot_state,
        }))
    }

    /// attestationApplicationId: `SEQUENCE { SET OF SEQUENCE { OCTET STRING name, INTEGER
    /// version }, SET OF OCTET STRING digest }`, itself inside an OCTET STRING.
    #[allow(clippy::type_complexity)]
    fn application(&self) -> Result<(Vec<String>, Vec<Vec<u8>>), AttestationRefusal> {
        let Some(id) = self.get(709) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let bytes = expect_universal(id, Tag::OctetString, "attestationApplicationId")?;
        let (outer, rest) = element(bytes)?;
        if !rest.is_empty() {
            return Err(malformed(
                "attestationApplicationId has bytes after its end",
            ));
        }
        let fields = elements(expect_universal(
            &outer,
            Tag::Sequence,
            "attestationApplicationId",
        )?)?;
        let [infos, digests] = fields.as_slice() else {
            return Err(malformed("attestationApplicationId does not hold two sets"));
        };
        let mut packages = Vec::new();
        for info in elements(expect_universal(infos, Tag::Set, "packageInfos")?)? {
            let parts = elements(expect_universal(&info, Tag::Sequence, "packageInfo")?)?;
            let name = parts
                .first()
                .ok_or_else(|| malformed("packageInfo has no name"))?;
            let name = expect_universal(name, Tag::OctetString, "packageName")?;
            packages.push(String::from_utf8_lossy(name).into_owned());
        }
        let digests = elements(expect_universal(digests, Tag::Set, "signatureDigests")?)?
            .iter()
            .map(|d| expect_universal(d, Tag::OctetString, "signatureDigest").map(<[u8]>::to_vec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((packages, digests))
    }
}

/// Parses a KeyDescription extension value.
pub fn parse_key_description(der: &[u8]) -> Result<KeyDescription, AttestationRefusal> {
    let (outer, rest) = element(der)?;
    if !rest.is_empty() {
        return Err(malformed("bytes after the KeyDescription"));
    }
    let fields = elements(expect_universal(&outer, Tag::Sequence, "KeyDescription")?)?;
    if fields.len() < 8 {
        return Err(malformed(format!("{} fields, not 8", fields.len())));
    }
    let attestation_version = integer(&fields[0], "attestationVersion")?;
    let attestation_security_level = security_level(&fields[1], "attestationSecurityLevel")?;
    integer(&fields[2], "keyMintVersion")?;
    let keymint_security_level = security_level(&fields[3], "keyMintSecurityLevel")?;
    let challenge = expect_universal(&fields[4], Tag::OctetString, "attestationChallenge")?;
    expect_universal(&fields[5], Tag::OctetString, "uniqueId")?;
    let software = AuthorizationList::parse(&fields[6], "softwareEnforced")?;
    let hardware = AuthorizationList::parse(&fields[7], "hardwareEnforced")?;
    // A hardware attestation is believed only for what the hardware itself enforces. A
    // software attestation is no stronger than either list, so either may say it.
    let (purposes, origin) = if attestation_security_level == SecurityLevel::Software {
        let mut purposes = hardware.purposes()?;
        purposes.extend(software.purposes()?);
        (purposes, hardware.origin()?.or(software.origin()?))
    } else {
        (hardware.purposes()?, hardware.origin()?)
    };
    let (packages, signature_digests) = software.application()?;
    Ok(KeyDescription {
        attestation_version,
        attestation_security_level,
        keymint_security_level,
        challenge: challenge.to_vec(),
        purposes,
        origin,
        root_of_trust: hardware.root_of_trust()?,
        packages,
        signature_digests,
    })
}

/// The KeyDescription of the chain's leaf; refuses a chain where any other certificate
/// carries one (only the leaf describes the attested key).
pub fn key_description(
    chain: &[X509Certificate<'_>],
) -> Result<KeyDescription, AttestationRefusal> {
    let oid: Oid<'static> =
        x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17])
            .map_err(|_| malformed("OID"))?;
    let mut found = None;
    for (i, cert) in chain.iter().enumerate() {
        for ext in cert.extensions() {
            if ext.oid == oid {
                if i != 0 {
                    return Err(AttestationRefusal::BadChain(format!(
                        "certificate {i} carries a KeyDescription; only the leaf may"
                    )));
                }
                if found.is_some() {
                    return Err(malformed("the leaf carries two KeyDescriptions"));
                }
                found = Some(ext.value);
            }
        }
    }
    let value = found.ok_or_else(|| {
        AttestationRefusal::Malformed(format!(
            "the leaf has no KeyDescription extension ({KEY_DESCRIPTION_OID}): not an \
             Android Key Attestation chain"
        ))
    })?;
    parse_key_description(value)
}
