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
