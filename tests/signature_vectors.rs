//! The test vectors published in docs/payment-signature.md, recomputed: the documented intent
//! bytes, and signatures that verify under the documented key through the real server path.

use payra::client::encode_intent;
use payra::ra::signature::{signed_message, verify_intent_signature};
use payra::wire::proto;

/// Reads `name: value` from the fenced vector block of the document.
fn doc_value(doc: &str, name: &str) -> String {
    let prefix = format!("{name}: ");
    let mut value = String::new();
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(&prefix));
    if let Some(first) = lines.next() {
        value.push_str(first[prefix.len()..].trim());
        // Long hex values continue on indented lines.
        for line in lines {
            if !line.starts_with("    ") {
                break;
            }
            value.push_str(line.trim());
        }
    }
    assert!(!value.is_empty(), "docs/payment-signature.md has no {name}");
    value
}

fn vector_intent() -> proto::PaymentIntent {
    proto::PaymentIntent {
        customer_id: "cust-0001".into(),
        device_id: "phone-0001".into(),
        merchant_id: "m-coffee-42".into(),
        order_id: "order-20261125-0001".into(),
        amount_fen: 1234,
        currency: "CNY".into(),
        created_at_ms: 1_795_622_400_000,
        nonce: (0u8..32).collect(),
        scene: proto::Scene::DynamicBarcode as i32,
    }
}

#[test]
fn documented_vectors_hold() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/payment-signature.md"
    ))
    .expect("docs/payment-signature.md");
    let secret_hex = doc_value(&doc, "private_key_hex");
    let public_hex = doc_value(&doc, "public_key_hex");
    let intent_hex = doc_value(&doc, "intent_hex");
    let message_hex = doc_value(&doc, "signed_message_hex");
    let der_hex = doc_value(&doc, "signature_der_hex");
    let raw_hex = doc_value(&doc, "signature_raw_hex");

    assert_eq!(
        hex::decode(&secret_hex).unwrap(),
        sha2_of(b"payra test vector key 1"),
        "the test key is SHA-256 of its published label"
    );
    let secret = p256::SecretKey::from_slice(&hex::decode(&secret_hex).unwrap()).unwrap();
    let public = secret.public_key().to_sec1_bytes();
    assert_eq!(hex::encode(&public), public_hex, "public key");

    let intent = encode_intent(&vector_intent());
    assert_eq!(hex::encode(&intent), intent_hex, "intent bytes");
    assert_eq!(
        hex::encode(signed_message(&intent)),
        message_hex,
        "signed message"
    );

    // RFC 6979 deterministic ECDSA gives the same signature every time.
    use p256::ecdsa::signature::Signer;
    let signing = p256::ecdsa::SigningKey::from(&secret);
    let sig: p256::ecdsa::Signature = signing.sign(&signed_message(&intent));
    assert_eq!(
        hex::encode(sig.to_der().as_bytes()),
        der_hex,
        "DER signature"
    );
    assert_eq!(hex::encode(sig.to_bytes()), raw_hex, "raw signature");

    assert!(verify_intent_signature(
        &public,
        &intent,
        &hex::decode(&der_hex).unwrap()
    ));
    assert!(verify_intent_signature(
        &public,
        &intent,
        &hex::decode(&raw_hex).unwrap()
    ));
    let mut tampered = intent.clone();
    tampered[10] ^= 1;
    assert!(!verify_intent_signature(
        &public,
        &tampered,
        &hex::decode(&der_hex).unwrap()
    ));
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The SM2 curve's a, b and generator (GB/T 32918.5), which Z_A hashes.
const SM2_A: &str = "fffffffeffffffffffffffffffffffffffffffff00000000fffffffffffffffc";
const SM2_B: &str = "28e9fa9e9d9f5e344d5a9e4bcf6509a7f39789f515ab8f92ddbcbd414d940e93";
const SM2_GX: &str = "32c4ae2c1f1981195f9904466a39c9948fe30bbff2660be1715a4589334c74c7";
const SM2_GY: &str = "bc3736a2f4f6779c59bdcee36b692153d0a9877cc62a474002df32e52139f0a0";

/// Z_A = SM3(ENTL_A || ID_A || a || b || x_G || y_G || x_A || y_A), with the default id.
fn sm2_z(public: &[u8]) -> Vec<u8> {
    use sm3::Digest;
    let id = payra::ca::sm2::DEFAULT_DISTID.as_bytes();
    let mut hash = sm3::Sm3::new();
    hash.update(((id.len() * 8) as u16).to_be_bytes());
    hash.update(id);
    for constant in [SM2_A, SM2_B, SM2_GX, SM2_GY] {
        hash.update(hex::decode(constant).unwrap());
    }
    hash.update(&public[1..]);
    hash.finalize().to_vec()
}

#[test]
fn documented_sm2_vectors_hold() {
    use sm2::dsa::signature::hazmat::PrehashVerifier;
    use sm2::dsa::signature::Signer;
    use sm3::Digest;
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/payment-signature.md"
    ))
    .expect("docs/payment-signature.md");
    let secret_hex = doc_value(&doc, "sm2_private_key_hex");
    assert_eq!(
        hex::decode(&secret_hex).unwrap(),
        sha2_of(b"payra test vector key sm2 1"),
        "the SM2 test key is SHA-256 of its published label"
    );
    let secret = sm2::SecretKey::from_slice(&hex::decode(&secret_hex).unwrap()).unwrap();
    let public =
        sm2::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false)
            .as_bytes()
            .to_vec();
    assert_eq!(hex::encode(&public), doc_value(&doc, "sm2_public_key_hex"));

    // The same intent and signed message as the P-256 vectors.
    let intent = encode_intent(&vector_intent());
    assert_eq!(hex::encode(&intent), doc_value(&doc, "intent_hex"));
    let message = signed_message(&intent);

    // Z_A and e = SM3(Z_A || M), computed by hand: what an SDK without an SM2 signer that
    // takes a distinguishing id must hash itself.
    let z = sm2_z(&public);
    assert_eq!(hex::encode(&z), doc_value(&doc, "sm2_z_hex"));
    let mut hash = sm3::Sm3::new();
    hash.update(&z);
    hash.update(&message);
    let e = hash.finalize().to_vec();
    assert_eq!(hex::encode(&e), doc_value(&doc, "sm2_e_hex"));

    // The sm2 crate signs deterministically: the documented signature, DER and raw.
    let signing = sm2::dsa::SigningKey::new(payra::ca::sm2::DEFAULT_DISTID, &secret).unwrap();
    let signature: sm2::dsa::Signature = signing.sign(&message);
    let der_hex = doc_value(&doc, "sm2_signature_der_hex");
    let raw_hex = doc_value(&doc, "sm2_signature_raw_hex");
    assert_eq!(
        hex::encode(payra::ca::sm2::signature_to_der(&signature).unwrap()),
        der_hex
    );
    assert_eq!(hex::encode(signature.to_bytes()), raw_hex);
    // It is a signature over e: the hand-computed Z_A is the one SM2 uses.
    signing
        .verifying_key()
        .verify_prehash(&e, &signature)
        .expect("the signature is over SM3(Z_A || M)");

    // payra's VerifyPayment path accepts both encodings and refuses a changed intent.
    use payra::model::KeyAlgorithm::Sm2;
    use payra::ra::signature::verify_intent_signature_with;
    for encoded in [&der_hex, &raw_hex] {
        let bytes = hex::decode(encoded).unwrap();
        assert!(verify_intent_signature_with(Sm2, &public, &intent, &bytes));
        let mut tampered = intent.clone();
        tampered[10] ^= 1;
        assert!(!verify_intent_signature_with(
            Sm2, &public, &tampered, &bytes
        ));
        // An SM2 signature is not a P-256 one.
        assert!(!verify_intent_signature(&public, &intent, &bytes));
    }
    // Nor is the documented P-256 signature an SM2 one, under the SM2 key or under the
    // P-256 vector's own point read as an SM2 key (it is not on the SM2 curve).
    let p256_public = hex::decode(doc_value(&doc, "public_key_hex")).unwrap();
    for p256_signature in [
        doc_value(&doc, "signature_der_hex"),
        doc_value(&doc, "signature_raw_hex"),
    ] {
        let bytes = hex::decode(p256_signature).unwrap();
        assert!(verify_intent_signature(&p256_public, &intent, &bytes));
        assert!(!verify_intent_signature_with(Sm2, &public, &intent, &bytes));
        assert!(!verify_intent_signature_with(
            Sm2,
            &p256_public,
            &intent,
            &bytes
        ));
    }
}
