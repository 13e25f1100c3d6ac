//! Device signatures over payment intents. See docs/payment-signature.md.
//!
//! The hot path verifies with ring, the audited implementation rustls already uses; the p256
//! crate is kept for key types and the device-side signer. A test checks that both agree.

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};

use crate::model::KeyAlgorithm;

/// The domain-separation prefix: the signature covers `PREFIX || intent_bytes`.
pub const SIGNING_PREFIX: &[u8] = b"payra.v1.PaymentIntent\n";

/// Longest signature accepted: a DER ECDSA P-256 or SM2 signature is at most 72 bytes.
pub const MAX_SIGNATURE_BYTES: usize = 72;

/// The exact bytes a device signs for `intent_bytes`.
pub fn signed_message(intent_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_PREFIX.len() + intent_bytes.len());
    message.extend_from_slice(SIGNING_PREFIX);
    message.extend_from_slice(intent_bytes);
    message
}

/// Whether `signature` (DER, or raw 64-byte r‖s) is a valid ECDSA P-256 / SHA-256 signature
/// by `public_key` (uncompressed SEC1) over the signed message of `intent_bytes`.
///
/// A 64-byte signature is read as raw r‖s first; if that fails and it starts like a DER
/// SEQUENCE it is tried as DER too. Both low-S and high-S signatures are accepted: replay
/// protection rests on the nonce, not on the signature bytes (docs/payment-signature.md).
pub fn verify_intent_signature(public_key: &[u8], intent_bytes: &[u8], signature: &[u8]) -> bool {
    verify_intent_signature_with(KeyAlgorithm::P256, public_key, intent_bytes, signature)
}

/// [`verify_intent_signature`] for a key of `algorithm`: for SM2, an SM2 signature with SM3
/// and the default distinguishing id `1234567812345678`, DER or raw r‖s, over the same
/// prefixed bytes.
pub fn verify_intent_signature_with(
    algorithm: KeyAlgorithm,
    public_key: &[u8],
    intent_bytes: &[u8],
    signature: &[u8],
) -> bool {
    verify_message(
        algorithm,
        public_key,
        &signed_message(intent_bytes),
        signature,
    )
}

/// Whether `signature` (DER, or raw r‖s) by `public_key` of `algorithm` verifies over
/// `message`: ECDSA P-256 with SHA-256, or SM2 with SM3 under the default distinguishing id.
pub fn verify_message(
    algorithm: KeyAlgorithm,
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    if algorithm == KeyAlgorithm::Sm2 {
        return crate::ca::sm2::verify(public_key, message, signature);
    }
    let der = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key);
    if signature.len() == 64 {
        let raw = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key);
        if raw.verify(message, signature).is_ok() {
            return true;
        }
        return signature[0] == 0x30 && der.verify(message, signature).is_ok();
    }
    der.verify(message, signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::{Signer, Verifier};
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

    fn p256_verify(public_key: &[u8], intent: &[u8], signature: &[u8]) -> bool {
        let Ok(key) = VerifyingKey::from_sec1_bytes(public_key) else {
            return false;
        };
        let message = signed_message(intent);
        let parsed = if signature.len() == 64 {
            Signature::from_slice(signature).ok()
        } else {
            Signature::from_der(signature).ok()
        };
        parsed.is_some_and(|sig| key.verify(&message, &sig).is_ok())
    }

    /// Flips S to N - S: a different, equally valid ECDSA signature.
    fn high_s(signature: &Signature) -> Signature {
        let (r, s) = signature.split_scalars();
        Signature::from_scalars(r, -*s).expect("valid scalars")
    }

    #[test]
    fn ring_and_p256_agree_on_valid_invalid_and_high_s() {
        let mut cases = 0;
        for i in 0..64u32 {
            let key = SigningKey::random(&mut rand::rngs::OsRng);
            let public = key.verifying_key().to_encoded_point(false);
            let public = public.as_bytes();
            let intent = format!("intent-{i}").into_bytes();
            let good: Signature = key.sign(&signed_message(&intent));
            let flipped = high_s(&good);
            let other_key = SigningKey::random(&mut rand::rngs::OsRng);
            let foreign: Signature = other_key.sign(&signed_message(&intent));
            let mut corrupted = good.to_bytes().to_vec();
            corrupted[i as usize % 64] ^= 0x01;
            let candidates: Vec<(Vec<u8>, bool)> = vec![
                (good.to_der().as_bytes().to_vec(), true),
                (good.to_bytes().to_vec(), true),
                (flipped.to_der().as_bytes().to_vec(), true),
                (flipped.to_bytes().to_vec(), true),
                (foreign.to_der().as_bytes().to_vec(), false),
                (corrupted, false),
                (Vec::new(), false),
                (vec![0x30; 70], false),
            ];
            for (signature, valid) in candidates {
                let by_ring = verify_intent_signature(public, &intent, &signature);
                let by_p256 = p256_verify(public, &intent, &signature);
                assert_eq!(by_ring, valid, "ring, case {i}");
                assert_eq!(by_p256, valid, "p256, case {i}");
                cases += 1;
            }
            // A valid signature over other bytes does not verify.
            assert!(!verify_intent_signature(public, b"other", &good.to_bytes()));
        }
        assert_eq!(cases, 64 * 8);
    }
}
