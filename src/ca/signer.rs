//! The CA signing seam. Everything the CA signs goes through [`CaSigner`], so a PKCS#11 HSM or a
//! KMS can replace the key file without touching the profiles.

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey, PKCS_ECDSA_P256_SHA256};

use crate::error::{Error, Result};
use crate::model::KeyAlgorithm;

/// A CA private key that signs with ECDSA P-256 / SHA-256, or with SM2 / SM3.
pub trait CaSigner: Send + Sync {
    /// The public key as an uncompressed SEC1 point (65 octets).
    fn public_key_sec1(&self) -> &[u8];

    /// Signs `message` (hashing it with SHA-256, or for SM2 with SM3 after the default
    /// distinguishing id's Z value) and returns a DER signature.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>>;

    /// The key's algorithm; what it signs says so in its signature algorithm field.
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::P256
    }
}

/// A P-256 key loaded from a PKCS#8 file, signing with ring.
pub struct KeyFileSigner {
    key: KeyPair,
}

/// Fewest PBKDF2 iterations accepted for an encrypted issuing key (OpenSSL's default is
/// 2048; `openssl pkcs8 -iter 600000` is what docs/operations.md shows).
pub const MIN_PBKDF2_ITERATIONS: u32 = 100_000;
/// Smallest scrypt cost (N) accepted.
const MIN_SCRYPT_COST: u64 = 1 << 15;

/// Refuses encryption too weak to protect a CA key: PBES1 (DES, RC2, MD5), a non-AES cipher,
/// PBKDF2 with SHA-1 or fewer than [`MIN_PBKDF2_ITERATIONS`] iterations, a salt under 8
/// bytes, or scrypt below N = 32768.
fn check_key_encryption(scheme: &pkcs8::pkcs5::EncryptionScheme<'_>) -> Result<()> {
    use pkcs8::pkcs5::pbes2::{EncryptionScheme as Cipher, Kdf, Pbkdf2Prf};
    let weak = |why: String| {
        Err(Error::FailedPrecondition(format!(
            "the issuing key's encryption is too weak ({why}); re-encrypt it with \
             openssl pkcs8 -topk8 -v2 aes-256-cbc -v2prf hmacWithSHA256 -iter 600000"
        )))
    };
    let pkcs8::pkcs5::EncryptionScheme::Pbes2(params) = scheme else {
        return weak("PBES1".into());
    };
    match params.encryption {
        Cipher::Aes128Cbc { .. } | Cipher::Aes192Cbc { .. } | Cipher::Aes256Cbc { .. } => {}
        _ => return weak("the cipher is not AES".into()),
    }
    match &params.kdf {
        Kdf::Pbkdf2(pbkdf2) => {
            if pbkdf2.prf == Pbkdf2Prf::HmacWithSha1 {
                return weak("PBKDF2 with HMAC-SHA-1".into());
            }
            if pbkdf2.iteration_count < MIN_PBKDF2_ITERATIONS {
                return weak(format!(
                    "{} PBKDF2 iterations, fewer than {MIN_PBKDF2_ITERATIONS}",
                    pbkdf2.iteration_count
                ));
            }
            if pbkdf2.salt.len() < 8 {
                return weak("a salt shorter than 8 bytes".into());
            }
        }
        Kdf::Scrypt(scrypt) => {
            if scrypt.cost_parameter < MIN_SCRYPT_COST {
                return weak(format!(
                    "scrypt N = {}, less than {MIN_SCRYPT_COST}",
                    scrypt.cost_parameter
                ));
            }
            if scrypt.salt.len() < 8 {
                return weak("a salt shorter than 8 bytes".into());
            }
        }
        _ => return weak("an unknown key derivation".into()),
    }
    Ok(())
}

/// The PKCS#8 DER of a PEM key file (`what` names it in messages), decrypting an encrypted
/// PKCS#8 block (PBES2, checked by [`check_key_encryption`]) with `passphrase`.
pub(crate) fn pkcs8_from_pem(text: &str, passphrase: Option<&str>, what: &str) -> Result<Vec<u8>> {
    let block = pem::parse(text)
        .map_err(|e| Error::FailedPrecondition(format!("{what} is not PEM: {e}")))?;
    match block.tag() {
        "PRIVATE KEY" => Ok(block.into_contents()),
        "ENCRYPTED PRIVATE KEY" => {
            let Some(passphrase) = passphrase else {
                return Err(Error::FailedPrecondition(format!(
                    "the {what} is encrypted; set PAYRA_CA_KEY_PASSPHRASE or \
                     ca_key_passphrase_file"
                )));
            };
            use pkcs8::der::Decode;
            let encrypted = pkcs8::EncryptedPrivateKeyInfo::from_der(block.contents())
                .map_err(|e| Error::FailedPrecondition(format!("{what}: {e}")))?;
            check_key_encryption(&encrypted.encryption_algorithm)?;
            let decrypted = encrypted.decrypt(passphrase).map_err(|_| {
                Error::FailedPrecondition(format!(
                    "cannot decrypt the {what}: wrong passphrase or unsupported cipher"
                ))
            })?;
            Ok(decrypted.as_bytes().to_vec())
        }
        other => Err(Error::FailedPrecondition(format!(
            "{what} is a PEM {other:?} block; a PKCS#8 key is needed"
        ))),
    }
}

impl KeyFileSigner {
    /// Loads a PKCS#8 PEM P-256 key, decrypting an encrypted PKCS#8 block (PBES2) with
    /// `passphrase`. The block's label decides which it is. An encrypted key without a
    /// passphrase, or with a wrong one, is refused.
    pub fn from_pem(text: &str, passphrase: Option<&str>) -> Result<Self> {
        let pkcs8_der = pkcs8_from_pem(text, passphrase, "issuing key")?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8_der.as_slice()),
            &PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| Error::FailedPrecondition(format!("issuing key is not P-256: {e}")))?;
        Ok(KeyFileSigner { key })
    }

    /// Wraps an rcgen key pair (used by `payra init`, which generates the keys).
    pub fn from_key_pair(key: KeyPair) -> Result<Self> {
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(Error::internal("CA key is not P-256"));
        }
        Ok(KeyFileSigner { key })
    }
}

impl CaSigner for KeyFileSigner {
    fn public_key_sec1(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        self.key
            .sign(message)
            .map_err(|e| Error::internal(format!("CA signing failed: {e}")))
    }
}

/// Presents any [`CaSigner`] to rcgen.
pub(crate) struct RcgenSigner<'a>(pub &'a dyn CaSigner);

impl PublicKeyData for RcgenSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key_sec1()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

thread_local! {
    /// The error of the last failed signature on this thread, which rcgen's error type
    /// cannot carry (see [`signing_error`]).
    static SIGN_ERROR: std::cell::RefCell<Option<Error>> = const { std::cell::RefCell::new(None) };
}

impl SigningKey for RcgenSigner<'_> {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0.sign(message).map_err(|e| {
            SIGN_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
            rcgen::Error::RingUnspecified
        })
    }
}

/// The error for rcgen's failure `e` while `context`: the signer's own error if it was
/// unavailable (an HSM out of reach: `UNAVAILABLE`, the client may retry), else internal.
pub(crate) fn signing_error(context: &str, e: rcgen::Error) -> Error {
    match SIGN_ERROR.with(|slot| slot.borrow_mut().take()) {
        Some(unavailable @ Error::Unavailable(_)) => unavailable,
        Some(signer) => Error::internal(format!("{context}: {signer}")),
        None => Error::internal(format!("{context}: {e}")),
    }
}
