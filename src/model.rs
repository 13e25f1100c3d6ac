//! Value types shared by every layer: identifiers that are valid by construction, serials and
//! revocation reasons. Parsing happens once, at the edge; past it these types cannot be wrong.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Characters allowed in customer and device identifiers: ASCII letters, digits and `._:@-`.
/// Narrow on purpose: they appear in certificate subjects, URIs and log lines.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')
}

fn parse_id(field: &'static str, value: &str, max_len: usize) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > max_len {
        return Err(Error::invalid(
            field,
            format!("is {} characters; at most {max_len} allowed", value.len()),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(Error::invalid(
            field,
            format!("contains {bad:?}; allowed are A-Z a-z 0-9 and . _ : @ -"),
        ));
    }
    Ok(value.to_string())
}

fn rfc3339(unix_s: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

/// A moment for people and programs alike, in messages: `2026-12-04T01:05:05Z (Unix
/// 1796341505)`.
pub fn moment(unix_s: i64) -> String {
    match rfc3339(unix_s) {
        Some(text) => format!("{text} (Unix {unix_s})"),
        None => format!("{unix_s} (Unix seconds)"),
    }
}

/// [`moment`] of a time in Unix milliseconds: `2026-12-04T01:05:05Z (Unix ms 1796341505123)`.
pub fn moment_ms(unix_ms: i64) -> String {
    match rfc3339(unix_ms.div_euclid(1000)) {
        Some(text) => format!("{text} (Unix ms {unix_ms})"),
        None => format!("{unix_ms} (Unix ms)"),
    }
}

/// A customer of the payment institution: 1-64 characters of `[A-Za-z0-9._:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    /// Longest accepted identifier.
    pub const MAX_LEN: usize = 64;

    /// Parses `value`, naming `field` in the error.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        parse_id(field, value, Self::MAX_LEN).map(CustomerId)
    }

    /// An identifier payra validated when it stored it (the verification cache hands it back
    /// on every request, so it is not checked again).
    pub(crate) fn validated(value: &str) -> Self {
        debug_assert!(parse_id("id", value, Self::MAX_LEN).is_ok(), "{value:?}");
        CustomerId(value.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device (one app installation): 1-128 characters of `[A-Za-z0-9._:@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest accepted identifier.
    pub const MAX_LEN: usize = 128;

    /// Parses `value`, naming `field` in the error.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        parse_id(field, value, Self::MAX_LEN).map(DeviceId)
    }

    /// An identifier payra validated when it stored it (the verification cache hands it back
    /// on every request, so it is not checked again).
    pub(crate) fn validated(value: &str) -> Self {
        debug_assert!(parse_id("id", value, Self::MAX_LEN).is_ok(), "{value:?}");
        DeviceId(value.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_conversions {
    ($ty:ident, $field:literal) => {
        impl TryFrom<String> for $ty {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                $ty::parse($field, &value)
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype_conversions!(CustomerId, "customer_id");
string_newtype_conversions!(DeviceId, "device_id");

/// A certificate serial number: 1-20 octets, positive, minimal DER encoding. Shown as
/// lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A fresh random serial: 16 octets, the top bit clear (positive) and the next one set (no
    /// leading zero octet), so 126 bits of entropy and a canonical 32-digit hex form.
    pub fn random() -> Serial {
        let mut bytes: [u8; 16] = rand::random();
        bytes[0] = (bytes[0] & 0x7f) | 0x40;
        Serial(bytes.to_vec())
    }

    /// A fresh serial for a device certificate: 16 octets, the issuance time in milliseconds
    /// (42 bits used today, 46 available) under a first octet of `0x40`–`0x7f` (positive,
    /// no leading zero octet), then 80 random bits, more than the 64 bits of CSPRNG output
    /// the CA/Browser Forum asks of a serial.
    ///
    /// Why the time first: the certificate trees are keyed by serial, and a B-tree takes
    /// inserts at its right edge far more cheaply than at random places. With random serials
    /// each enrollment rewrote a random leaf, which sled's page cache stops holding once the
    /// database grows (sled alone, 100,000 certificates: 191 µs per enrollment with random
    /// serials, 120 µs with these).
    pub fn time_ordered(now_ms: i64) -> Serial {
        let time = u64::try_from(now_ms).unwrap_or(0) & ((1 << 46) - 1);
        // Six octets: the bits 01, then the 46 bits of the time.
        let head = (1u64 << 46) | time;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&head.to_be_bytes()[2..]);
        let random: [u8; 10] = rand::random();
        bytes[6..].copy_from_slice(&random);
        Serial(bytes.to_vec())
    }

    /// Parses lowercase or uppercase hex; naming `field` in the error.
    pub fn parse(field: &'static str, value: &str) -> Result<Serial> {
        if value.is_empty() {
            return Err(Error::invalid(field, "is required"));
        }
        if value.len() > 40 {
            return Err(Error::invalid(
                field,
                "is longer than 20 octets (40 hex digits)",
            ));
        }
        let padded = if value.len() % 2 == 1 {
            format!("0{value}")
        } else {
            value.to_string()
        };
        let bytes =
            hex::decode(&padded).map_err(|_| Error::invalid(field, "must be hexadecimal"))?;
        Serial::from_bytes(field, &bytes)
    }

    /// Takes the big-endian magnitude as found in a certificate, stripping leading zero
    /// octets.
    pub fn from_bytes(field: &'static str, bytes: &[u8]) -> Result<Serial> {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        let trimmed = &bytes[first..];
        if trimmed.is_empty() {
            return Err(Error::invalid(field, "must not be zero"));
        }
        if trimmed.len() > 20 {
            return Err(Error::invalid(field, "is longer than 20 octets"));
        }
        Ok(Serial(trimmed.to_vec()))
    }

    /// The big-endian magnitude, without a sign octet.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex, the form used on the wire and in storage keys.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

impl TryFrom<String> for Serial {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Serial::parse("serial", &value)
    }
}

impl From<Serial> for String {
    fn from(value: Serial) -> String {
        value.to_hex()
    }
}

/// The algorithm of a device key, and so of the CA hierarchy that certifies it and of the
/// payment signatures it makes: ECDSA P-256 with SHA-256, or SM2 with SM3 (GM/T 0003, the
/// default distinguishing id `1234567812345678`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    #[default]
    P256,
    Sm2,
}

impl KeyAlgorithm {
    /// Both, in the order configuration and messages list them.
    pub const ALL: [KeyAlgorithm; 2] = [KeyAlgorithm::P256, KeyAlgorithm::Sm2];

    /// The name configuration and the API use: `p256` or `sm2`.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::P256 => "p256",
            KeyAlgorithm::Sm2 => "sm2",
        }
    }

    /// The algorithm named `name` (`p256` or `sm2`).
    pub fn parse(name: &str) -> Option<KeyAlgorithm> {
        KeyAlgorithm::ALL.into_iter().find(|a| a.name() == name)
    }

    /// What people call it: `EC P-256` or `SM2`.
    pub fn display_name(self) -> &'static str {
        match self {
            KeyAlgorithm::P256 => "EC P-256",
            KeyAlgorithm::Sm2 => "SM2",
        }
    }

    /// One byte for the compact binary forms (summaries, cache entries).
    pub fn code(self) -> u8 {
        match self {
            KeyAlgorithm::P256 => 0,
            KeyAlgorithm::Sm2 => 1,
        }
    }

    /// The algorithm of [`KeyAlgorithm::code`] `code`.
    pub fn from_code(code: u8) -> Option<KeyAlgorithm> {
        KeyAlgorithm::ALL.into_iter().find(|a| a.code() == code)
    }

    /// For serde's `skip_serializing_if`: records of P-256 keys stay as they were.
    pub fn is_p256(&self) -> bool {
        *self == KeyAlgorithm::P256
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// RFC 5280 CRLReason values an operator may choose (caCompromise, aACompromise and
/// removeFromCRL are not certificate-level choices here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// The RFC 5280 CRLReason code.
    pub fn code(self) -> u8 {
        match self {
            RevocationReason::Unspecified => 0,
            RevocationReason::KeyCompromise => 1,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
            RevocationReason::CertificateHold => 6,
            RevocationReason::PrivilegeWithdrawn => 9,
        }
    }

    /// Every reason payra uses.
    pub const ALL: [RevocationReason; 7] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
    ];

    /// The reason with RFC 5280 CRLReason `code`, if payra uses it.
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        RevocationReason::ALL
            .into_iter()
            .find(|reason| reason.code() == code)
    }

    /// The kebab-case name used by the CLI (`key-compromise`).
    pub fn cli_name(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
            RevocationReason::CertificateHold => "certificate-hold",
            RevocationReason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }
}

/// What the phone said about itself at enrollment; bounded, informational, never in a
/// certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub platform: String,
    pub model: String,
    pub os_version: String,
    pub app_version: String,
}

impl DeviceInfo {
    /// Longest accepted value of each field.
    pub const MAX_FIELD_LEN: usize = 128;

    /// Checks lengths and rejects control characters, naming the field.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("device_info.platform", &self.platform),
            ("device_info.model", &self.model),
            ("device_info.os_version", &self.os_version),
            ("device_info.app_version", &self.app_version),
        ] {
            if value.len() > Self::MAX_FIELD_LEN {
                return Err(Error::invalid(
                    field,
                    format!("at most {} bytes allowed", Self::MAX_FIELD_LEN),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(Error::invalid(field, "must not contain control characters"));
            }
        }
        Ok(())
    }
}

// The vocabulary of the PBOC limit tiers; the rules that use it live in `ra::tiers`.

/// A category of authentication factor (43号 Art. 22). "Two factors" means two *categories*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorCategory {
    /// Known only to the customer: static password, payment PIN.
    Knowledge,
    /// Held only by the customer: digital certificate, electronic signature, OTP over a
    /// secure channel.
    Possession,
    /// The customer's biometrics: fingerprint, face.
    Inherence,
}

impl FactorCategory {
    /// The lowercase name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            FactorCategory::Knowledge => "knowledge",
            FactorCategory::Possession => "possession",
            FactorCategory::Inherence => "inherence",
        }
    }
}

/// A factor the payment service verified itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Factor {
    pub category: FactorCategory,
    /// Free-form method name, for evidence: `payment_pin`, `sms_otp`, `fingerprint`.
    pub method: String,
}

/// Where the payment happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scene {
    InApp,
    DynamicBarcode,
    StaticBarcode,
    Online,
}

/// The limit tier of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// Two or more categories, one of them a digital certificate / electronic signature:
    /// limit agreed with the customer.
    A,
    /// Two or more categories without a certificate: 5,000 CNY a day.
    B,
    /// Fewer than two categories: 1,000 CNY a day.
    C,
    /// Static barcode, whatever the verification: 500 CNY a day.
    D,
}

impl Tier {
    /// Every tier, in the order of [`Tier::index`].
    pub const ALL: [Tier; 4] = [Tier::A, Tier::B, Tier::C, Tier::D];

    /// The tier's position in [`Tier::ALL`], for per-tier arrays.
    pub fn index(self) -> usize {
        match self {
            Tier::A => 0,
            Tier::B => 1,
            Tier::C => 2,
            Tier::D => 3,
        }
    }

    /// The letter, for keys and logs.
    pub fn letter(self) -> &'static str {
        match self {
            Tier::A => "A",
            Tier::B => "B",
            Tier::C => "C",
            Tier::D => "D",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_read_as_rfc_3339_beside_the_number() {
        assert_eq!(
            moment(1_796_341_505),
            "2026-12-03T23:45:05Z (Unix 1796341505)"
        );
        assert_eq!(
            moment_ms(1_796_341_505_123),
            "2026-12-03T23:45:05Z (Unix ms 1796341505123)"
        );
        assert_eq!(moment(i64::MAX), format!("{} (Unix seconds)", i64::MAX));
    }

    #[test]
    fn ok_ids() {
        for value in ["c1", "cust_42.x:y@z-1", &"a".repeat(64)] {
            CustomerId::parse("customer_id", value).expect(value);
        }
        DeviceId::parse("device_id", &"d".repeat(128)).expect("128 chars");
    }

    #[test]
    fn fail_ids() {
        for value in ["", "has space", "ünïcode", "semi;colon", &"a".repeat(65)] {
            let err = CustomerId::parse("customer_id", value).unwrap_err();
            assert!(err.to_string().starts_with("customer_id:"), "{err}");
        }
        assert!(DeviceId::parse("device_id", &"d".repeat(129)).is_err());
    }

    #[test]
    fn ok_serial_random_is_positive_canonical_16_octets() {
        for _ in 0..1000 {
            let serial = Serial::random();
            assert_eq!(serial.as_bytes().len(), 16);
            assert_eq!(serial.as_bytes()[0] & 0x80, 0, "positive");
            assert_ne!(serial.as_bytes()[0], 0, "no leading zero octet");
            assert_eq!(Serial::parse("serial", &serial.to_hex()).unwrap(), serial);
        }
    }

    #[test]
    fn ok_time_ordered_serials_sort_by_time_and_stay_canonical() {
        let times = [
            0,
            1,
            999,
            1_764_000_000_000,
            1_764_000_000_001,
            (1i64 << 46) - 1,
        ];
        let serials: Vec<Serial> = times.iter().map(|t| Serial::time_ordered(*t)).collect();
        for (serial, time) in serials.iter().zip(times) {
            let bytes = serial.as_bytes();
            assert_eq!(bytes.len(), 16);
            assert_eq!(bytes[0] & 0xc0, 0x40, "positive, no leading zero octet");
            assert_eq!(Serial::parse("serial", &serial.to_hex()).unwrap(), *serial);
            // The time comes back out of the first six octets.
            let mut head = [0u8; 8];
            head[2..].copy_from_slice(&bytes[..6]);
            assert_eq!((u64::from_be_bytes(head) & ((1u64 << 46) - 1)) as i64, time);
        }
        assert!(serials.windows(2).all(|w| w[0] < w[1]), "ordered by time");
        // Same millisecond: the 80 random bits tell them apart.
        let now = 1_764_000_000_000;
        let same: std::collections::HashSet<Serial> =
            (0..1000).map(|_| Serial::time_ordered(now)).collect();
        assert_eq!(same.len(), 1000);
    }

    #[test]
    fn serial_parse_cases() {
        assert_eq!(Serial::parse("s", "00ab").unwrap().to_hex(), "ab");
        assert_eq!(Serial::parse("s", "ABC").unwrap().to_hex(), "0abc");
        assert!(Serial::parse("s", "").is_err());
        assert!(Serial::parse("s", "00").is_err());
        assert!(Serial::parse("s", "xyz").is_err());
        assert!(Serial::parse("s", &"1".repeat(42)).is_err());
    }
}

/// Why an enrollment token could not enroll a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// No token with that value (or one that was purged).
    Unknown,
    Expired {
        expired_at_s: i64,
    },
    AlreadyUsed {
        used_at_s: i64,
    },
}

impl std::fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenRejection::Unknown => {
                f.write_str("enrollment token is not valid; ask the payment service for a new one")
            }
            TokenRejection::Expired { expired_at_s } => write!(
                f,
                "enrollment token expired at {}; ask the payment service for a new one",
                moment(*expired_at_s)
            ),
            TokenRejection::AlreadyUsed { .. } => {
                f.write_str("enrollment token has already been used; a token enrolls one key once")
            }
        }
    }
}

/// A revocation as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub revoked_at_s: i64,
    pub reason: RevocationReason,
}

impl Revocation {
    /// The revocation a certificate holds once `self` is applied over `existing`, or `None`
    /// when it cannot be: a revocation is final, except that a certificate on hold may be
    /// revoked for good. Then the hold's time stays the revocation time: the certificate has
    /// not been valid since it was held, and for a disputed payment the earlier time counts.
    pub fn applied_over(self, existing: Option<Revocation>) -> Option<Revocation> {
        match existing {
            None => Some(self),
            Some(held)
                if held.reason == RevocationReason::CertificateHold
                    && self.reason != RevocationReason::CertificateHold =>
            {
                Some(Revocation {
                    revoked_at_s: held.revoked_at_s.min(self.revoked_at_s),
                    reason: self.reason,
                })
            }
            Some(_) => None,
        }
    }
}

/// Why a certificate could not be revoked, renewed or released from hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeRejection {
    NotFound(Serial),
    AlreadyRevoked(Serial, Revocation),
    /// Unhold of a certificate that is not on hold.
    NotOnHold(Serial),
}

impl std::fmt::Display for RevokeRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevokeRejection::NotFound(serial) => {
                write!(f, "no certificate with serial {serial}")
            }
            RevokeRejection::AlreadyRevoked(serial, existing) => write!(
                f,
                "certificate {serial} was already revoked at {} with reason {}; a revocation \
                 is final (only certificate-hold can be released or made permanent)",
                moment(existing.revoked_at_s),
                existing.reason.cli_name()
            ),
            RevokeRejection::NotOnHold(serial) => write!(
                f,
                "certificate {serial} is not on hold; only certificate-hold can be released"
            ),
        }
    }
}

/// Why a reservation could not be given back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseRefusal {
    /// No evidence with that id.
    NotFound,
    NothingReserved,
    AlreadyReleased {
        released_at_ms: i64,
    },
    /// Reserved on `day`, before `kept_from`, the oldest day the limits still count.
    DayNotKept {
        day: String,
        kept_from: String,
    },
}

impl ReleaseRefusal {
    /// The message for the release of `evidence_id`.
    pub fn message(&self, evidence_id: &str) -> String {
        match self {
            ReleaseRefusal::NotFound => format!("no evidence with id {evidence_id}"),
            ReleaseRefusal::NothingReserved => format!("evidence {evidence_id} reserved nothing"),
            ReleaseRefusal::AlreadyReleased { released_at_ms } => format!(
                "evidence {evidence_id} was already released at {}",
                moment_ms(*released_at_ms)
            ),
            ReleaseRefusal::DayNotKept { day, kept_from } => format!(
                "evidence {evidence_id} reserved on {day}; daily limits are kept from \
                 {kept_from} on, so there is nothing left to give back"
            ),
        }
    }
}
