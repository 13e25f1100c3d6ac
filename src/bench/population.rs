//! The synthetic devices `payra bench populate` writes: record `i`'s serial, customer,
//! device and key pair are functions of `i`, so the load generator can sign payments as any
//! of them, chosen uniformly or with a Zipf skew (`payra bench --population N --skew S`).

use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::PrimeField;
use rand::Rng;
use sha2::Digest;

use crate::model::{CustomerId, DeviceId, Serial};
use crate::store::{CertificateRecord, RECORD_VERSION};

/// The length of the stand-in certificate each record carries (about a real one's).
const CERTIFICATE_DER_LEN: usize = 620;

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

/// Record `i` with its `public_key`, valid from 5 minutes before `now_s` for a year.
pub fn record(i: u64, now_s: i64, public_key: &[u8; 65]) -> Option<CertificateRecord> {
    Some(CertificateRecord {
        version: RECORD_VERSION,
        serial: serial(i),
        customer_id: CustomerId::parse("customer_id", &customer(i)).ok()?,
        device_id: DeviceId::parse("device_id", &device(i)).ok()?,
        device_info: Default::default(),
        subject: format!("CN={i:032x},O=payra device"),
        not_before_s: now_s - 300,
        not_after_s: now_s + 365 * 86_400,
        issued_at_s: now_s,
        public_key_hex: hex::encode(public_key),
        key_algorithm: Default::default(),
        certificate_b64: CertificateRecord::encode_der(&stand_in_certificate(i)),
        revocation: None,
        renewed_from: None,
        superseded_by: None,
        subscriber_ref: Some(format!("{i:032x}")),
        attestation: None,
        issued_upstream: false,
    })
}

/// The stand-in for record `i`'s certificate: as long as a real one, and as hard to
/// compress (a certificate is mostly keys, serials, identifiers and a signature), so what a
/// store's compression does with it is what it would do with real ones.
pub fn stand_in_certificate(i: u64) -> Vec<u8> {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    // SplitMix64 from a mixed index: seeded with the index itself, record i + 1's stream
    // would be record i's shifted by one word.
    let mut state = mix(i.wrapping_add(GAMMA));
    let mut der = Vec::with_capacity(CERTIFICATE_DER_LEN + 8);
    while der.len() < CERTIFICATE_DER_LEN {
        state = state.wrapping_add(GAMMA);
        der.extend_from_slice(&mix(state).to_le_bytes());
    }
    der.truncate(CERTIFICATE_DER_LEN);
    der
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
    fn records_carry_their_index_in_serial_and_ids() {
        let key = PublicKeys::from(7).next().unwrap();
        let record = record(7, 1_000_000, &key).unwrap();
        assert_eq!(record.certificate_der().unwrap(), stand_in_certificate(7));
        // Neighbours share no run of octets a compressor could use.
        let (this, next) = (stand_in_certificate(7), stand_in_certificate(8));
        for shift in 0..CERTIFICATE_DER_LEN - 16 {
            assert_ne!(this[shift..shift + 16], next[..16], "shifted by {shift}");
            assert_ne!(next[shift..shift + 16], this[..16], "shifted by {shift}");
        }
        assert_eq!(record.serial, serial(7));
        assert!(serial(7).as_bytes() < serial(256).as_bytes(), "ascending");
        assert_eq!(
            (record.customer_id.as_str(), record.device_id.as_str()),
            ("cust-3", "dev-7")
        );
        assert_eq!(record.public_key_hex, hex::encode(key));
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
