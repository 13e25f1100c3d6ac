//! Apple App Attest: the attestation object `DCAppAttestService.attestKey` returns, checked
//! as Apple's "Validating apps that connect to your server" gives the steps.
//!
//! The object is CBOR: `{"fmt": "apple-appattest", "attStmt": {"x5c": [credCert,
//! intermediate], "receipt": bytes}, "authData": bytes}`. `authData` is WebAuthn's:
//! rpIdHash (32) | flags (1) | signCount (4, big-endian) | aaguid (16) | credentialId length
//! (2) | credentialId | COSE key.

use ciborium::Value;
use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};
use x509_parser::certificate::X509Certificate;

use super::AttestationRefusal;

/// The largest attestation object accepted (Apple's are about 5.5 KB with the receipt).
pub const MAX_OBJECT: usize = 32 * 1024;

/// The nonce extension of the credential certificate.
const NONCE_OID: &[u64] = &[1, 2, 840, 113635, 100, 8, 2];

const AAGUID_PRODUCTION: &[u8; 16] = b"appattest\0\0\0\0\0\0\0";
const AAGUID_DEVELOPMENT: &[u8; 16] = b"appattestdevelop";

/// An attestation object, decoded but not yet checked.
#[derive(Debug, Clone)]
pub struct AttestationObject {
    pub x5c: Vec<Vec<u8>>,
    pub auth_data: Vec<u8>,
}

/// What a checked attestation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAttested {
    /// `<team id>.<bundle id>` of the configured app whose rpIdHash matched.
    pub app_id: String,
    pub development: bool,
    /// SHA-256 of the App Attest key's uncompressed point (Apple's key id).
    pub key_id: [u8; 32],
}

fn malformed(what: impl std::fmt::Display) -> AttestationRefusal {
    AttestationRefusal::Malformed(format!("App Attest object: {what}"))
}

/// The value under text key `name`; a key given twice is refused (no "first one wins").
fn field<'a>(
    map: &'a [(Value, Value)],
    name: &str,
) -> Result<Option<&'a Value>, AttestationRefusal> {
    let mut found = map.iter().filter(|(k, _)| k.as_text() == Some(name));
    let first = found.next().map(|(_, v)| v);
    if found.next().is_some() {
        return Err(malformed(format!("the key {name:?} appears twice")));
    }
    Ok(first)
}

/// Decodes the CBOR attestation object.
pub fn decode(bytes: &[u8]) -> Result<AttestationObject, AttestationRefusal> {
    if bytes.len() > MAX_OBJECT {
        return Err(malformed(format!(
            "{} bytes; at most {MAX_OBJECT}",
            bytes.len()
        )));
    }
    let mut reader = bytes;
    let value: Value =
        ciborium::de::from_reader(&mut reader).map_err(|e| malformed(format!("not CBOR: {e}")))?;
    if !reader.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the object",
            reader.len()
        )));
    }
    let map = value.as_map().ok_or_else(|| malformed("not a CBOR map"))?;
    match field(map, "fmt")?.and_then(Value::as_text) {
        Some("apple-appattest") => {}
        Some(other) => {
            return Err(malformed(format!(
                "fmt is {other:?}, not \"apple-appattest\""
            )))
        }
        None => return Err(malformed("no fmt")),
    }
    let statement = field(map, "attStmt")?
        .and_then(Value::as_map)
        .ok_or_else(|| malformed("no attStmt map"))?;
    let x5c = field(statement, "x5c")?
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no attStmt.x5c array"))?
        .iter()
        .map(|c| {
            c.as_bytes()
                .cloned()
                .ok_or_else(|| malformed("an x5c entry is not bytes"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth_data = field(map, "authData")?
        .and_then(Value::as_bytes)
        .ok_or_else(|| malformed("no authData bytes"))?
        .clone();
    Ok(AttestationObject { x5c, auth_data })
}

/// The OCTET STRING inside the credential certificate's nonce extension
/// (`SEQUENCE { [1] EXPLICIT OCTET STRING }`).
fn certificate_nonce(cert: &X509Certificate<'_>) -> Result<Vec<u8>, AttestationRefusal> {
    let oid = x509_parser::oid_registry::Oid::from(NONCE_OID).map_err(|_| malformed("OID"))?;
    let mut found = cert.extensions().iter().filter(|e| e.oid == oid);
    let ext = found
        .next()
        .ok_or_else(|| malformed("the credential certificate has no nonce extension"))?;
    if found.next().is_some() {
        return Err(malformed(
            "the credential certificate has two nonce extensions",
        ));
    }
    let bad = || malformed("the nonce extension is not SEQUENCE { [1] OCTET STRING }");
    let (_, outer) = Any::from_der(ext.value).map_err(|_| bad())?;
    if outer.header.tag() != Tag::Sequence {
        return Err(bad());
    }
    let (_, tagged) = Any::from_der(outer.data).map_err(|_| bad())?;
    if tagged.header.class() != Class::ContextSpecific || tagged.header.tag().0 != 1 {
        return Err(bad());
    }
    let (_, octets) = Any::from_der(tagged.data).map_err(|_| bad())?;
    if octets.header.tag() != Tag::OctetString {
        return Err(bad());
    }
    Ok(octets.data.to_vec())
}

/// Checks everything but the chain (which the caller has verified to Apple's root):
/// the nonce binds `client_data_hash`, the key id is the certificate's key, the app is one of
/// `app_ids`, the counter is zero, and the environment is production unless `development`.
pub fn check(
    object: &AttestationObject,
    leaf: &X509Certificate<'_>,
    client_data_hash: &[u8; 32],
    app_ids: &[String],
    allow_development: bool,
) -> Result<AppAttested, AttestationRefusal> {
    let mut nonce_input = object.auth_data.clone();
    nonce_input.extend_from_slice(client_data_hash);
    let nonce = Sha256::digest(&nonce_input);
    if certificate_nonce(leaf)?[..] != nonce[..] {
        return Err(AttestationRefusal::WrongChallenge(
            "the App Attest nonce is not SHA-256(authData || clientDataHash) for this \
             enrollment's client data"
                .into(),
        ));
    }
    let data = &object.auth_data;
    if data.len() < 55 {
        return Err(malformed(format!(
            "authData is {} bytes; at least 55",
            data.len()
        )));
    }
    let rp_id_hash = &data[..32];
    let sign_count = u32::from_be_bytes([data[33], data[34], data[35], data[36]]);
    let aaguid = &data[37..53];
    let id_len = usize::from(u16::from_be_bytes([data[53], data[54]]));
    let credential_id = data
        .get(55..55 + id_len)
        .ok_or_else(|| malformed("authData ends inside the credential id"))?;
    let spki = leaf.public_key();
    let point = &spki.subject_public_key.data;
    let p256 = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
    if !p256 || point.len() != 65 || point[0] != 0x04 {
        return Err(malformed(
            "the credential certificate's key is not an uncompressed P-256 point",
        ));
    }
    let key_id: [u8; 32] = Sha256::digest(point.as_ref()).into();
    if credential_id != key_id {
        return Err(AttestationRefusal::KeyMismatch(
            "the credential id in authData is not the SHA-256 of the attested key".into(),
        ));
    }
    let app_id = app_ids
        .iter()
        .find(|id| Sha256::digest(id.as_bytes())[..] == *rp_id_hash)
        .ok_or_else(|| {
            AttestationRefusal::UnknownApp(format!(
                "the attestation is for an app whose id hashes to {}, none of the configured \
                 [attestation] apple_app_ids",
                hex::encode(rp_id_hash)
            ))
        })?;
    if sign_count != 0 {
        return Err(malformed(format!("sign count is {sign_count}, not 0")));
    }
    let development = match aaguid {
        a if a == AAGUID_PRODUCTION => false,
        a if a == AAGUID_DEVELOPMENT => true,
        _ => {
            return Err(malformed(
                "aaguid is neither App Attest production nor development",
            ))
        }
    };
    if development && !allow_development {
        return Err(AttestationRefusal::UnknownApp(
            "the attestation comes from App Attest's development environment; set \
             [attestation] apple_development = true to accept it"
                .into(),
        ));
    }
    Ok(AppAttested {
        app_id: app_id.clone(),
        development,
        key_id,
    })
}
