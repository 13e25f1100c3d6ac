//! The compact binary form of a [`CertificateRecord`], as the embedded store keeps it.
//!
//! Version 1 records were JSON with the certificate in base64: about 1,450 bytes for a
//! typical device certificate, of which 828 were base64. The compact form keeps the same
//! fields, the DER and the public key raw, in about 850. Readers take both: a JSON record
//! starts with `{`, a compact one with [`COMPACT_TAG`].
//!
//! Layout, in order (`str8` is a length octet then UTF-8, `bytes16` a big-endian u16 length
//! then the octets, `i64` big-endian):
//!
//! | field | form |
//! |---|---|
//! | tag | `0xC2` |
//! | serial | length octet, then the octets |
//! | customer id, device id | `str8` each |
//! | device info: platform, model, OS version, app version | `str8` each |
//! | subject | `bytes16` (UTF-8) |
//! | notBefore, notAfter, issued at | `i64` each |
//! | key algorithm | one octet ([`KeyAlgorithm::code`]) |
//! | public key | length octet, then the key as SEC1 octets |
//! | certificate | `bytes16`, DER |
//! | flags | one octet: 1 revocation, 2 renewed from, 4 superseded by, 8 subscriber reference, 16 attestation, 32 issued upstream |
//! | revocation (flag 1) | revoked at `i64`, then the CRLReason code |
//! | renewed from, superseded by (flags 2, 4) | length octet, then the serial's octets |
//! | subscriber reference (flag 8) | `str8` |
//! | attestation (flag 16) | `bytes16`, the attestation as JSON |
//!
//! Nothing may follow. The record's `version` stays the logical version (1): the fields are
//! the same, only their form differs.

use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, DeviceInfo, KeyAlgorithm, RevocationReason, Serial};
use crate::store::records::{CertificateRecord, Revocation, RECORD_VERSION};

/// The first octet of a compact record (a JSON record starts with `{`).
pub const COMPACT_TAG: u8 = 0xC2;

const REVOKED: u8 = 1;
const RENEWED_FROM: u8 = 2;
const SUPERSEDED_BY: u8 = 4;
const SUBSCRIBER_REF: u8 = 8;
const ATTESTED: u8 = 16;
const UPSTREAM: u8 = 32;
const KNOWN_FLAGS: u8 = 63;

impl CertificateRecord {
    /// The compact binary form (see the module's documentation).
    pub fn to_compact(&self) -> Result<Vec<u8>> {
        let der = self.certificate_der()?;
        let public_key = hex::decode(&self.public_key_hex).map_err(|_| {
            Error::internal(format!(
                "certificate {}: the public key is not hex",
                self.serial
            ))
        })?;
        let mut out = Writer(Vec::with_capacity(160 + der.len() + self.subject.len()));
        out.short(self.serial.as_bytes())?;
        out.short(self.customer_id.as_str().as_bytes())?;
        out.short(self.device_id.as_str().as_bytes())?;
        let info = &self.device_info;
        for field in [
            &info.platform,
            &info.model,
            &info.os_version,
            &info.app_version,
        ] {
            out.short(field.as_bytes())?;
        }
        out.long(self.subject.as_bytes())?;
        for time in [self.not_before_s, self.not_after_s, self.issued_at_s] {
            out.0.extend_from_slice(&time.to_be_bytes());
        }
        out.0.push(self.key_algorithm.code());
        out.short(&public_key)?;
        out.long(&der)?;
        let attestation = self
            .attestation
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| Error::internal(format!("encoding an attestation: {e}")))?;
        let flags = [
            (self.revocation.is_some(), REVOKED),
            (self.renewed_from.is_some(), RENEWED_FROM),
            (self.superseded_by.is_some(), SUPERSEDED_BY),
            (self.subscriber_ref.is_some(), SUBSCRIBER_REF),
            (attestation.is_some(), ATTESTED),
            (self.issued_upstream, UPSTREAM),
        ];
        out.0
            .push(flags.iter().filter(|(set, _)| *set).map(|(_, f)| f).sum());
        if let Some(revocation) = self.revocation {
            out.0
                .extend_from_slice(&revocation.revoked_at_s.to_be_bytes());
            out.0.push(revocation.reason.code());
        }
        for serial in [&self.renewed_from, &self.superseded_by]
            .into_iter()
            .flatten()
        {
            out.short(serial.as_bytes())?;
        }
        if let Some(reference) = &self.subscriber_ref {
            out.short(reference.as_bytes())?;
        }
        if let Some(attestation) = attestation {
            out.long(&attestation)?;
        }
        let mut bytes = out.0;
        bytes.insert(0, COMPACT_TAG);
        Ok(bytes)
    }

    /// Reads a stored record in either form: compact, or JSON as version 1 wrote it.
    pub fn from_stored(bytes: &[u8]) -> Result<CertificateRecord> {
        match bytes.first() {
            // A stored field that does not parse is damage in the store, not a bad request:
            // never INVALID_ARGUMENT, which would blame the caller.
            Some(&COMPACT_TAG) => Self::from_compact(&bytes[1..]).map_err(|e| match e.kind() {
                crate::error::ErrorKind::Internal => e,
                _ => bad(&e.to_string()),
            }),
            _ => serde_json::from_slice(bytes)
                .map_err(|e| Error::internal(format!("decoding a certificate record: {e}"))),
        }
    }

    fn from_compact(bytes: &[u8]) -> Result<CertificateRecord> {
        let mut r = Reader(bytes);
        let serial = Serial::from_bytes("serial", r.short()?)?;
        let customer_id = CustomerId::parse("customer_id", r.short_str()?)?;
        let device_id = DeviceId::parse("device_id", r.short_str()?)?;
        let device_info = DeviceInfo {
            platform: r.short_str()?.to_string(),
            model: r.short_str()?.to_string(),
            os_version: r.short_str()?.to_string(),
            app_version: r.short_str()?.to_string(),
        };
        let subject = r.long_str()?.to_string();
        let (not_before_s, not_after_s, issued_at_s) = (r.i64()?, r.i64()?, r.i64()?);
        let key_algorithm =
            KeyAlgorithm::from_code(r.octet()?).ok_or_else(|| bad("unknown key algorithm"))?;
        let public_key_hex = hex::encode(r.short()?);
        let certificate_b64 = CertificateRecord::encode_der(r.long()?);
        let flags = r.octet()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad("unknown flags"));
        }
        let has = |flag: u8| flags & flag != 0;
        let revocation = if has(REVOKED) {
            let revoked_at_s = r.i64()?;
            let reason = RevocationReason::from_code(r.octet()?)
                .ok_or_else(|| bad("unknown revocation reason"))?;
            Some(Revocation {
                revoked_at_s,
                reason,
            })
        } else {
            None
        };
        let mut serial_if = |flag: u8| -> Result<Option<Serial>> {
            has(flag)
                .then(|| Serial::from_bytes("serial", r.short()?))
                .transpose()
        };
        let renewed_from = serial_if(RENEWED_FROM)?;
        let superseded_by = serial_if(SUPERSEDED_BY)?;
        let subscriber_ref = has(SUBSCRIBER_REF)
            .then(|| r.short_str().map(str::to_string))
            .transpose()?;
        let attestation = has(ATTESTED)
            .then(|| {
                serde_json::from_slice(r.long()?).map_err(|e| bad(&format!("attestation: {e}")))
            })
            .transpose()?;
        if !r.0.is_empty() {
            return Err(bad("bytes after the last field"));
        }
        Ok(CertificateRecord {
            version: RECORD_VERSION,
            serial,
            customer_id,
            device_id,
            device_info,
            subject,
            not_before_s,
            not_after_s,
            issued_at_s,
            public_key_hex,
            key_algorithm,
            certificate_b64,
            revocation,
            renewed_from,
            superseded_by,
            subscriber_ref,
            attestation,
            issued_upstream: has(UPSTREAM),
        })
    }
}

fn bad(what: &str) -> Error {
    Error::internal(format!("compact certificate record: {what}"))
}

struct Writer(Vec<u8>);

impl Writer {
    /// A length octet, then `bytes` (at most 255).
    fn short(&mut self, bytes: &[u8]) -> Result<()> {
        let len = u8::try_from(bytes.len()).map_err(|_| bad("a short field is over 255 octets"))?;
        self.0.push(len);
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    /// A big-endian u16 length, then `bytes` (at most 65,535).
    fn long(&mut self, bytes: &[u8]) -> Result<()> {
        let len = u16::try_from(bytes.len()).map_err(|_| bad("a field is over 65,535 octets"))?;
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn octet(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64> {
        let bytes = self.take(8)?.try_into().map_err(|_| bad("integer"))?;
        Ok(i64::from_be_bytes(bytes))
    }

    fn short(&mut self) -> Result<&'a [u8]> {
        let len = self.octet()? as usize;
        self.take(len)
    }

    fn long(&mut self) -> Result<&'a [u8]> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| bad("length"))?);
        self.take(len as usize)
    }

    fn short_str(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.short()?).map_err(|_| bad("a text field is not UTF-8"))
    }

    fn long_str(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.long()?).map_err(|_| bad("a text field is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CertificateRecord {
        let json = r#"{"version":1,"serial":"4a1b2c3d4e5f60718293a4b5c6d7e8f9",
            "customer_id":"cust-1","device_id":"dev-1",
            "device_info":{"platform":"android","model":"Pixel 8","os_version":"15","app_version":"1.0"},
            "subject":"CN=7f3a,O=payra device","not_before_s":1763999700,
            "not_after_s":1795536000,"issued_at_s":1764000000,"public_key_hex":"04aabb",
            "certificate_b64":"AAEC","revocation":null,
            "renewed_from":null,"superseded_by":null}"#;
        serde_json::from_str(json).unwrap()
    }

    /// The compact form of a plain record, byte for byte. If this fails, stored records no
    /// longer read: add a new tag and read both.
    #[test]
    fn golden_compact_record() {
        let record = record();
        let golden = concat!(
            "c2",
            "104a1b2c3d4e5f60718293a4b5c6d7e8f9",
            "06637573742d31",
            "056465762d31",
            "07616e64726f6964",
            "07506978656c2038",
            "023135",
            "03312e30",
            "0016434e3d376633612c4f3d706179726120646576696365",
            "0000000069247fd4",
            "000000006b05b480",
            "0000000069248100",
            "00",
            "0304aabb",
            "0003000102",
            "00",
        );
        let compact = record.to_compact().unwrap();
        assert_eq!(hex::encode(&compact), golden);
        assert_eq!(CertificateRecord::from_stored(&compact).unwrap(), record);
    }

    #[test]
    fn every_optional_field_round_trips() {
        let attestation = crate::attestation::Attestation {
            platform: crate::attestation::Platform::Android,
            security_level: crate::attestation::SecurityLevel::StrongBox,
            boot_state: None,
            device_locked: Some(true),
            root: "google".into(),
            root_key_sha256: "ab".repeat(32),
            apps: vec!["com.example.pay".into()],
            attested_at_s: 1_764_000_000,
            chain_serials: vec!["01".into()],
        };
        let full = CertificateRecord {
            key_algorithm: KeyAlgorithm::Sm2,
            revocation: Some(Revocation {
                revoked_at_s: 1_764_000_500,
                reason: RevocationReason::KeyCompromise,
            }),
            renewed_from: Some(Serial::parse("serial", "01ff").unwrap()),
            superseded_by: Some(Serial::parse("serial", "7a").unwrap()),
            subscriber_ref: Some("00112233445566778899aabbccddeeff".into()),
            attestation: Some(attestation),
            issued_upstream: true,
            ..record()
        };
        let compact = full.to_compact().unwrap();
        assert_eq!(CertificateRecord::from_stored(&compact).unwrap(), full);
        // Each optional field alone.
        for one in [
            CertificateRecord {
                revocation: full.revocation,
                ..record()
            },
            CertificateRecord {
                superseded_by: full.superseded_by.clone(),
                ..record()
            },
            CertificateRecord {
                subscriber_ref: full.subscriber_ref.clone(),
                ..record()
            },
            CertificateRecord {
                issued_upstream: true,
                ..record()
            },
        ] {
            let compact = one.to_compact().unwrap();
            assert_eq!(CertificateRecord::from_stored(&compact).unwrap(), one);
        }
    }

    #[test]
    fn json_records_still_read() {
        let record = record();
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(CertificateRecord::from_stored(&json).unwrap(), record);
    }

    #[test]
    fn damaged_compact_records_are_errors() {
        let compact = record().to_compact().unwrap();
        for len in 1..compact.len() {
            let refused = CertificateRecord::from_stored(&compact[..len]).unwrap_err();
            assert!(refused.to_string().contains("internal"), "{refused}");
        }
        let mut longer = compact.clone();
        longer.push(0);
        assert!(CertificateRecord::from_stored(&longer).is_err());
        let mut unknown_flag = compact.clone();
        *unknown_flag.last_mut().unwrap() = 64;
        assert!(CertificateRecord::from_stored(&unknown_flag).is_err());
        // A field that reads but does not parse (a space in the customer id, "cust-1" after
        // the tag and the 17 octets of the serial) is damage too, never the caller's error.
        let mut bad_customer = compact.clone();
        assert_eq!(&bad_customer[18..25], b"\x06cust-1");
        bad_customer[19] = b' ';
        let refused = CertificateRecord::from_stored(&bad_customer).unwrap_err();
        assert_eq!(
            refused.kind(),
            crate::error::ErrorKind::Internal,
            "{refused}"
        );
        assert!(refused.to_string().contains("customer_id"), "{refused}");
        let not_base64 = CertificateRecord {
            certificate_b64: "AA!C".into(),
            ..record()
        };
        assert!(not_base64.to_compact().is_err());
    }
}
