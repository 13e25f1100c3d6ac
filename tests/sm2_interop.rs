//! Groundwork for SM2/SM3 device certificates and payments: the RustCrypto `sm2` crate
//! (SM2 signatures with SM3 and a distinguishing id, GM/T 0003) against OpenSSL 3's CLI, both
//! ways, with the default id `1234567812345678` that GB/T 35276 names and OpenSSL's
//! `-sigopt distid:` sets. Signatures travel as DER `SEQUENCE { r INTEGER, s INTEGER }`
//! (GB/T 35275), which is what OpenSSL writes.

mod common;

use common::*;
use der::{Decode, Encode};
use sm2::dsa::signature::{Signer, Verifier};
use sm2::dsa::{Signature, SigningKey, VerifyingKey};
use sm2::pkcs8::DecodePrivateKey;

const DISTID: &str = "1234567812345678";

/// An SM2 signature as DER: two unsigned integers.
#[derive(der::Sequence)]
struct DerSignature<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

fn to_der(signature: &Signature) -> Vec<u8> {
    let bytes = signature.to_bytes();
    DerSignature {
        r: der::asn1::UintRef::new(&bytes[..32]).unwrap(),
        s: der::asn1::UintRef::new(&bytes[32..]).unwrap(),
    }
    .to_der()
    .unwrap()
}

fn from_der(der: &[u8]) -> Signature {
    let parsed = DerSignature::from_der(der).unwrap();
    let mut bytes = [0u8; 64];
    let (r, s) = (parsed.r.as_bytes(), parsed.s.as_bytes());
    bytes[32 - r.len()..32].copy_from_slice(r);
    bytes[64 - s.len()..].copy_from_slice(s);
    Signature::from_slice(&bytes).unwrap()
}

/// An SM2 key made by OpenSSL (PKCS#8 PEM), its public key PEM, and the crate's keys.
fn openssl_sm2_key(dir: &std::path::Path) -> (String, String, SigningKey) {
    let key = dir.join("sm2.pem");
    let (ok, text) = openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:SM2",
        "-out",
        path_str(&key),
    ]);
    assert!(ok, "{text}");
    let public = dir.join("sm2.pub.pem");
    let (ok, text) = openssl(&[
        "pkey",
        "-in",
        path_str(&key),
        "-pubout",
        "-out",
        path_str(&public),
    ]);
    assert!(ok, "{text}");
    let pem = std::fs::read_to_string(&key).unwrap();
    let secret = sm2::SecretKey::from_pkcs8_pem(&pem).expect("OpenSSL's SM2 PKCS#8 reads");
    let signing = SigningKey::new(DISTID, &secret).unwrap();
    (
        path_str(&key).to_string(),
        path_str(&public).to_string(),
        signing,
    )
}

#[test]
fn an_sm2_signature_made_by_the_crate_verifies_with_openssl_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public, signing) = openssl_sm2_key(dir.path());
    let message = b"payra.v1.PaymentIntent\n\x0a\x05alice";
    let message_file = dir.path().join("message");
    std::fs::write(&message_file, message).unwrap();
    let distid = format!("distid:{DISTID}");

    // The crate signs; OpenSSL verifies with SM3 and the same id.
    let signature = signing.sign(message);
    let signature_file = dir.path().join("crate.sig");
    std::fs::write(&signature_file, to_der(&signature)).unwrap();
    let (ok, text) = openssl(&[
        "dgst",
        "-sm3",
        "-verify",
        &public,
        "-sigopt",
        &distid,
        "-signature",
        path_str(&signature_file),
        path_str(&message_file),
    ]);
    assert!(ok && text.contains("Verified OK"), "{text}");

    // With another id the same signature does not verify: the id is part of what is signed.
    let (ok, text) = openssl(&[
        "dgst",
        "-sm3",
        "-verify",
        &public,
        "-sigopt",
        "distid:1234567812345679",
        "-signature",
        path_str(&signature_file),
        path_str(&message_file),
    ]);
    assert!(!ok, "{text}");

    // OpenSSL signs; the crate verifies, DER and raw r||s alike.
    let openssl_signature = dir.path().join("openssl.sig");
    let (ok, text) = openssl(&[
        "dgst",
        "-sm3",
        "-sign",
        &key,
        "-sigopt",
        &distid,
        "-out",
        path_str(&openssl_signature),
        path_str(&message_file),
    ]);
    assert!(ok, "{text}");
    let der = std::fs::read(&openssl_signature).unwrap();
    let verifying: &VerifyingKey = signing.verifying_key();
    let from_openssl = from_der(&der);
    verifying
        .verify(message, &from_openssl)
        .expect("OpenSSL's SM2 signature verifies with the crate");
    let raw = Signature::from_slice(&from_openssl.to_bytes()).unwrap();
    verifying.verify(message, &raw).unwrap();
    // A changed message does not.
    assert!(verifying
        .verify(b"payra.v1.PaymentIntent\n", &from_openssl)
        .is_err());
    // Nor does the right signature under another id.
    let other =
        VerifyingKey::from_sec1_bytes("1234567812345679", &verifying.to_sec1_bytes()).unwrap();
    assert!(other.verify(message, &from_openssl).is_err());
}
