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

    /// The reason with RFC 5280 CRLReason `code`, if payra uses it.
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        [
            RevocationReason::Unspecified,
            RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged,
            RevocationReason::Superseded,
            RevocationReason::CessationOfOperation,
            RevocationReason::CertificateHold,
            RevocationReason::PrivilegeWithdrawn,
        ]
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
    fn serial_parse_cases() {
        assert_eq!(Serial::parse("s", "00ab").unwrap().to_hex(), "ab");
        assert_eq!(Serial::parse("s", "ABC").unwrap().to_hex(), "0abc");
        assert!(Serial::parse("s", "").is_err());
        assert!(Serial::parse("s", "00").is_err());
        assert!(Serial::parse("s", "xyz").is_err());
        assert!(Serial::parse("s", &"1".repeat(42)).is_err());
    }
}
