//! The synthetic devices `payra bench populate` writes: record `i`'s serial, customer,
//! device and key pair are functions of `i`, so the load generator can sign payments as any
//! of them, chosen uniformly or with a Zipf skew (`payra bench --population N --skew S`).

use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::PrimeField;
use rand::Rng;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, Serial};
use crate::store::{CertificateRecord, RECORD_VERSION};

/// Record `i`'s serial: 16 octets, `0x40`, seven zeros, then `i` big-endian. Ascending, as
/// `Serial::time_ordered` makes them in production: with random serials sled took the
/// inserts at random places in its trees (1M records: 77 s, 3.5 GB of peak RSS and 5.7 GB of
/// disk, against 35 s, 0.57 GB and 3.0 GB in order).
pub fn serial(i: u64) -> Serial {
    let mut bytes = [0u8; 16];
    bytes[0] = 0x40;
    bytes[8..].copy_from_slice(&i.to_be_bytes());
    Serial::from_bytes("serial", &bytes).unwrap_or_else(|_| Serial::random())
}

/// Record `i`'s customer: two devices each.
pub fn customer(i: u64) -> String {
    format!("cust-{}", i / 2)
}

/// Record `i`'s device.
pub fn device(i: u64) -> String {
    format!("dev-{i}")
}

/// The population's first secret scalar; record `i`'s is this plus `i`.
fn base_scalar() -> p256::Scalar {
    let mut seed = sha2::Sha256::digest(b"payra bench population").to_vec();
    loop {
        let bytes: [u8; 32] = seed.as_slice().try_into().unwrap_or([1; 32]);
        if let Some(scalar) = Option::<p256::Scalar>::from(p256::Scalar::from_repr(bytes.into())) {
            return scalar;
        }
        seed = sha2::Sha256::digest(&seed).to_vec();
    }
}

/// Record `i`'s device key. Consecutive secrets: anyone can derive them; benchmark data only.
pub fn secret_key(i: u64) -> p256::SecretKey {
    let scalar = base_scalar() + p256::Scalar::from(i);
    let nonzero = Option::<p256::NonZeroScalar>::from(p256::NonZeroScalar::new(scalar))
        .unwrap_or_else(|| p256::NonZeroScalar::from_uint(1u64.into()).unwrap());
    p256::SecretKey::from(nonzero)
}

/// The uncompressed public keys of records `from`, `from + 1`, …: one point addition each
/// (about 9 µs) instead of a scalar multiplication (about 165 µs).
pub struct PublicKeys {
    point: p256::ProjectivePoint,
}

impl PublicKeys {
    pub fn from(first: u64) -> PublicKeys {
        PublicKeys {
            point: secret_key(first).public_key().to_projective(),
        }
    }
}

impl Iterator for PublicKeys {
    type Item = [u8; 65];

    fn next(&mut self) -> Option<[u8; 65]> {
        let encoded = self.point.to_affine().to_encoded_point(false);
        let mut key = [0u8; 65];
        key.copy_from_slice(encoded.as_bytes());
        self.point += p256::ProjectivePoint::GENERATOR;
        Some(key)
    }
}

/// Record `i` with its `public_key` and its certificate from `certificates`.
pub fn record(i: u64, certificates: &StandIns, public_key: &[u8; 65]) -> Option<CertificateRecord> {
    Some(CertificateRecord {
        version: RECORD_VERSION,
        serial: serial(i),
        customer_id: CustomerId::parse("customer_id", &customer(i)).ok()?,
        device_id: DeviceId::parse("device_id", &device(i)).ok()?,
        device_info: Default::default(),
        subject: format!("CN={},O=payra device", subscriber(i)),
        not_before_s: certificates.not_before_s,
        not_after_s: certificates.not_after_s,
        issued_at_s: certificates.not_before_s + certificates.backdate_s,
        public_key_hex: hex::encode(public_key),
        key_algorithm: Default::default(),
        certificate_b64: CertificateRecord::encode_der(&certificates.certificate(i, public_key)),
        revocation: None,
        renewed_from: None,
        superseded_by: None,
        subscriber_ref: Some(subscriber(i)),
        attestation: None,
        issued_upstream: false,
    })
}

/// The record whose certificate is the template: an index whose serial, key and subscriber
/// reference occur nowhere else in its certificate (record 0's reference, 32 zeros, would).
const TEMPLATE: u64 = 0x7e3a_91c4_5b2d_f068;

/// Record `i`'s subscriber reference, the name its certificate carries.
fn subscriber(i: u64) -> String {
    format!("{i:032x}")
}

/// The records' certificates. One real device certificate, issued by payra's own profile
/// under a throwaway development CA, is the template; each record's is the template with
/// what differs from one real certificate to the next put in: the record's serial, key and
/// subscriber reference, and pseudo-random octets for the key identifier and the
/// signature's r and s. So a record's certificate has a real one's length, layout and
/// entropy, and a store's compression does with it what it would with real ones; but its
/// signature does not verify (benchmark data only).
pub struct StandIns {
    template: Vec<u8>,
    serial: std::ops::Range<usize>,
    key: std::ops::Range<usize>,
    key_id: std::ops::Range<usize>,
    subscriber: Vec<std::ops::Range<usize>>,
    /// r and s.
    signature: [std::ops::Range<usize>; 2],
    pub not_before_s: i64,
    pub not_after_s: i64,
    backdate_s: i64,
}

impl StandIns {
    /// Issues the template at `now_s` with the default configuration's profile, under a
    /// development CA made in a temporary directory and removed again.
    pub fn new(now_s: i64) -> Result<StandIns> {
        let dir = std::env::temp_dir().join(format!(
            "payra-stand-ins-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let issued = Self::issue(&dir, now_s);
        // The throwaway CA's keys go whether or not the issue worked.
        let _ = std::fs::remove_dir_all(&dir);
        let (der, not_before_s, not_after_s, backdate_s) = issued?;
        Self::from_template(der, not_before_s, not_after_s, backdate_s)
    }

    fn issue(dir: &std::path::Path, now_s: i64) -> Result<(Vec<u8>, i64, i64, i64)> {
        crate::ca::pki::init_dev_pki(dir, false)?;
        let ca = crate::ca::pki::CaMaterial::load(dir, None)?;
        let config = crate::config::Config::default();
        let profile = crate::ca::profile::DeviceProfile {
            validity_s: i64::from(config.issuance.validity_days) * 86_400,
            backdate_s: i64::from(config.issuance.backdate_s),
            crl_url: config.crl_url(),
            ocsp_url: config.ocsp_url(),
            issuer_not_after_s: ca.issuing_not_after_s,
        };
        let key = PublicKeys::from(TEMPLATE)
            .next()
            .ok_or_else(|| Error::internal("no key"))?;
        let key = crate::ca::csr::DevicePublicKey::from_sec1(&key)?;
        let subscriber = crate::ca::profile::SubscriberRef::parse(&subscriber(TEMPLATE))
            .ok_or_else(|| Error::internal("subscriber reference"))?;
        let certificate = crate::ca::profile::issue_device_certificate(
            &ca.issuer,
            &profile,
            &key,
            &serial(TEMPLATE),
            &subscriber,
            now_s,
        )?;
        Ok((
            certificate.der,
            certificate.not_before_s,
            certificate.not_after_s,
            profile.backdate_s,
        ))
    }

    /// Finds in `der` (record [`TEMPLATE`]'s certificate) where each record's differs.
    fn from_template(
        der: Vec<u8>,
        not_before_s: i64,
        not_after_s: i64,
        backdate_s: i64,
    ) -> Result<StandIns> {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let bad = |what: &str| Error::internal(format!("the template certificate: {what}"));
        let (_, cert) = X509Certificate::from_der(&der).map_err(|_| bad("does not parse"))?;
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| bad("no subjectKeyIdentifier"))?;
        let signature = cert.signature_value.data.to_vec();
        let key = PublicKeys::from(TEMPLATE)
            .next()
            .ok_or_else(|| bad("no key"))?;
        let find_all = |needle: &[u8]| -> Vec<std::ops::Range<usize>> {
            der.windows(needle.len())
                .enumerate()
                .filter(|(_, window)| *window == needle)
                .map(|(at, _)| at..at + needle.len())
                .collect()
        };
        let once = |needle: &[u8], what: &str| -> Result<std::ops::Range<usize>> {
            match find_all(needle).as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(bad(&format!("{what} is not there exactly once"))),
            }
        };
        let signature_at = once(&signature, "the signature")?.start;
        // ECDSA-Sig-Value: SEQUENCE (short form) { INTEGER r, INTEGER s }.
        let integer = |at: usize| -> Result<std::ops::Range<usize>> {
            match (der.get(at), der.get(at + 1)) {
                (Some(0x02), Some(&len)) if len < 0x80 => Ok(at + 2..at + 2 + usize::from(len)),
                _ => Err(bad("the signature is not an ECDSA-Sig-Value")),
            }
        };
        let r = integer(signature_at + 2)?;
        let s = integer(r.end)?;
        if der.get(signature_at) != Some(&0x30) || s.end != der.len() {
            return Err(bad("the signature is not an ECDSA-Sig-Value"));
        }
        let subscriber = find_all(subscriber(TEMPLATE).as_bytes());
        if subscriber.len() != 2 {
            return Err(bad(
                "the subscriber reference is not in its name and its URI",
            ));
        }
        Ok(StandIns {
            serial: once(serial(TEMPLATE).as_bytes(), "the serial")?,
            key: once(&key, "the key")?,
            key_id: once(&key_id, "the key identifier")?,
            subscriber,
            signature: [r, s],
            template: der,
            not_before_s,
            not_after_s,
            backdate_s,
        })
    }

    /// Record `i`'s certificate, for its `public_key`.
    pub fn certificate(&self, i: u64, public_key: &[u8; 65]) -> Vec<u8> {
        let mut der = self.template.clone();
        der[self.serial.clone()].copy_from_slice(serial(i).as_bytes());
        der[self.key.clone()].copy_from_slice(public_key);
        for at in &self.subscriber {
            der[at.clone()].copy_from_slice(subscriber(i).as_bytes());
        }
        let mut random = PseudoRandom::new(i);
        random.fill(&mut der[self.key_id.clone()]);
        for integer in &self.signature {
            let integer = &mut der[integer.clone()];
            random.fill(integer);
            // A positive INTEGER in its shortest form, as the template's was: 33 octets
            // only behind a zero octet for a high bit.
            let padded = integer.len() > 32;
            match integer {
                [zero, high, ..] if padded => {
                    *zero = 0;
                    *high |= 0x80;
                }
                [first, ..] => *first = (*first & 0x7f).max(1),
                [] => {}
            }
        }
        der
    }
}

/// SplitMix64 seeded with a mixed index: seeded with the index itself, record i + 1's
/// stream would be record i's shifted by one word.
struct PseudoRandom(u64);

impl PseudoRandom {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    fn new(i: u64) -> PseudoRandom {
        PseudoRandom(Self::mix(i.wrapping_add(Self::GAMMA)))
    }

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 = self.0.wrapping_add(Self::GAMMA);
            let word = Self::mix(self.0).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Picks devices of a population of `size`: uniformly, or by a Zipf law of exponent `skew`
/// over ranks whose order is a fixed shuffle of the devices (so the popular ones are spread
/// over the serials, not the first few pages of the store).
pub struct Chooser {
    size: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
    stride: u64,
}

impl Chooser {
    /// `skew` 0 is uniform; a Zipf exponent otherwise (1.0 is the classic law).
    pub fn new(size: u64, skew: f64) -> Result<Chooser, String> {
        if size == 0 {
            return Err("the population is empty".into());
        }
        let zipf = if skew > 0.0 {
            Some(rand_distr::Zipf::new(size, skew).map_err(|e| format!("skew: {e}"))?)
        } else {
            None
        };
        // A stride coprime with the size makes rank → rank × stride mod size a permutation.
        let mut stride = ((size as f64 * 0.618_033_988_7) as u64).max(1);
        while gcd(stride, size) != 1 {
            stride += 1;
        }
        Ok(Chooser { size, zipf, stride })
    }

    /// A device index in `0..size`.
    pub fn pick(&self, rng: &mut impl Rng) -> u64 {
        let rank = match &self.zipf {
            Some(zipf) => (rng.sample(zipf) as u64).clamp(1, self.size) - 1,
            None => rng.gen_range(0..self.size),
        };
        ((u128::from(rank) * u128::from(self.stride)) % u128::from(self.size)) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    #[test]
    fn the_public_keys_in_order_are_those_of_the_secret_keys() {
        let keys: Vec<[u8; 65]> = PublicKeys::from(1_000).take(3).collect();
        for (n, key) in keys.iter().enumerate() {
            let expected = secret_key(1_000 + n as u64)
                .public_key()
                .to_encoded_point(false);
            assert_eq!(key.as_slice(), expected.as_bytes());
        }
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn records_carry_their_index_in_serial_ids_and_certificate() {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let now_s = 1_800_000_000;
        let stand_ins = StandIns::new(now_s).unwrap();
        let keys: Vec<[u8; 65]> = PublicKeys::from(7).take(2).collect();
        let record = record(7, &stand_ins, &keys[0]).unwrap();
        assert_eq!(record.serial, serial(7));
        assert!(serial(7).as_bytes() < serial(256).as_bytes(), "ascending");
        assert_eq!(
            (record.customer_id.as_str(), record.device_id.as_str()),
            ("cust-3", "dev-7")
        );
        assert_eq!(record.public_key_hex, hex::encode(keys[0]));
        assert_eq!(
            record.subscriber_ref.as_deref(),
            Some(subscriber(7).as_str())
        );
        assert_eq!(record.not_before_s, now_s - 300, "the default backdate");
        assert_eq!(record.issued_at_s, now_s);

        // The certificate parses and names what the record holds.
        let der = record.certificate_der().unwrap();
        let (rest, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(rest.is_empty());
        assert_eq!(cert.raw_serial(), serial(7).as_bytes());
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), &keys[0]);
        assert_eq!(
            cert.subject().to_string(),
            format!("O=payra device, CN={}", subscriber(7))
        );
        assert_eq!(cert.validity().not_before.timestamp(), record.not_before_s);
        assert_eq!(cert.validity().not_after.timestamp(), record.not_after_s);
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert!(
            uris.iter()
                .any(|uri| uri.contains(&format!(":{})", subscriber(7)))),
            "{uris:?}"
        );
        let signature = |cert: &X509Certificate| {
            p256::ecdsa::Signature::from_der(&cert.signature_value.data).unwrap()
        };
        let key_id = |cert: &X509Certificate| {
            cert.extensions()
                .iter()
                .find_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                    _ => None,
                })
                .unwrap()
        };
        // The neighbour's is as long, and differs where real ones differ.
        let next_der = stand_ins.certificate(8, &keys[1]);
        assert_eq!(next_der.len(), der.len());
        let (_, next) = X509Certificate::from_der(&next_der).unwrap();
        assert_ne!(signature(&next), signature(&cert));
        assert_ne!(key_id(&next), key_id(&cert));
        assert_eq!(next.issuer(), cert.issuer());
        // Record 7's certificate is the same each time.
        assert_eq!(stand_ins.certificate(7, &keys[0]), der);
    }

    #[test]
    fn choices_stay_in_the_population_and_a_skew_concentrates_them() {
        let mut rng = rand::thread_rng();
        // How often the most chosen device of 10,000 choices was chosen.
        let most = |chooser: &Chooser, rng: &mut rand::rngs::ThreadRng| {
            let mut counts = std::collections::HashMap::new();
            for _ in 0..10_000 {
                let i = chooser.pick(rng);
                assert!(i < 1_000_000);
                *counts.entry(i).or_insert(0) += 1;
            }
            counts.into_values().max().unwrap_or(0)
        };
        // Uniform: a device comes up about once. Zipf 1.0 over a million: the first rank's
        // share is 1/H(10^6), about 7 %, so about 700 times.
        let uniform = most(&Chooser::new(1_000_000, 0.0).unwrap(), &mut rng);
        let skewed = most(&Chooser::new(1_000_000, 1.0).unwrap(), &mut rng);
        assert!(uniform < 10, "{uniform}");
        assert!((400..1_100).contains(&skewed), "{skewed}");
        assert!(Chooser::new(0, 0.0).is_err());
    }
}
