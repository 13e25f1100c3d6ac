//! The in-memory view of every certificate the verifier needs: key, identity, validity and
//! revocation. Loaded at start, updated after each durable change and before the change is
//! acknowledged, so the hot path reads no disk and a revocation is effective for the very
//! next verification.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::error::Result;
use crate::model::{CustomerId, DeviceId, Serial};
use crate::store::{CertificateRecord, Revocation, Store};

/// What the verifier knows about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedCertificate {
    /// Uncompressed SEC1 P-256 point.
    pub public_key: [u8; 65],
    pub customer: CustomerId,
    pub device: DeviceId,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub revocation: Option<Revocation>,
}

/// A serial as a fixed-size key: its length, then up to 20 octets (RFC 5280's limit), so the
/// map needs no allocation per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SerialKey([u8; 21]);

impl SerialKey {
    fn of(serial: &Serial) -> Option<SerialKey> {
        let bytes = serial.as_bytes();
        if bytes.len() > 20 {
            return None;
        }
        let mut key = [0u8; 21];
        key[0] = bytes.len() as u8;
        key[1..=bytes.len()].copy_from_slice(bytes);
        Some(SerialKey(key))
    }
}

/// One certificate as stored in the map: about 120 bytes plus its identifiers, in two
/// allocations (a million certificates take about 230 MB).
#[derive(Debug)]
struct Entry {
    public_key: [u8; 65],
    /// `customer` + `device`, split at `customer_len`.
    ids: Box<str>,
    customer_len: u8,
    not_before_s: i64,
    not_after_s: i64,
    revocation: Option<Revocation>,
}

impl Entry {
    fn new(
        public_key: [u8; 65],
        customer: &CustomerId,
        device: &DeviceId,
        not_before_s: i64,
        not_after_s: i64,
        revocation: Option<Revocation>,
    ) -> Entry {
        let customer = customer.as_str();
        Entry {
            public_key,
            ids: format!("{customer}{}", device.as_str()).into_boxed_str(),
            // A customer id is at most 64 bytes.
            customer_len: customer.len() as u8,
            not_before_s,
            not_after_s,
            revocation,
        }
    }

    fn view(&self) -> CachedCertificate {
        let (customer, device) = self.ids.split_at(usize::from(self.customer_len));
        CachedCertificate {
            public_key: self.public_key,
            customer: CustomerId::validated(customer),
            device: DeviceId::validated(device),
            not_before_s: self.not_before_s,
            not_after_s: self.not_after_s,
            revocation: self.revocation,
        }
    }
}

fn public_key(hex_text: &str) -> Option<[u8; 65]> {
    let mut key = [0u8; 65];
    hex::decode_to_slice(hex_text, &mut key).ok()?;
    Some(key)
}

/// serial → certificate facts, shared by all request threads.
#[derive(Default)]
pub struct CertificateCache {
    map: RwLock<HashMap<SerialKey, Box<Entry>>>,
}

impl CertificateCache {
    /// Reads every certificate's summary from `store`.
    pub fn load(store: &dyn Store) -> Result<CertificateCache> {
        let mut map = HashMap::new();
        store.for_each_certificate_summary(&mut |summary| {
            let Some(key) = SerialKey::of(&summary.serial) else {
                return;
            };
            map.insert(
                key,
                Box::new(Entry::new(
                    summary.public_key,
                    &summary.customer_id,
                    &summary.device_id,
                    summary.not_before_s,
                    summary.not_after_s,
                    summary.revocation,
                )),
            );
        })?;
        map.shrink_to_fit();
        Ok(CertificateCache {
            map: RwLock::new(map),
        })
    }

    /// The facts about `serial`, if payra issued it.
    pub fn get(&self, serial: &Serial) -> Option<CachedCertificate> {
        let key = SerialKey::of(serial)?;
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|entry| entry.view())
    }

    /// Validity and revocation of `serial` (what a status query needs), without building the
    /// identifiers.
    pub fn standing(&self, serial: &Serial) -> Option<(i64, i64, Option<Revocation>)> {
        let key = SerialKey::of(serial)?;
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|entry| (entry.not_before_s, entry.not_after_s, entry.revocation))
    }

    /// Adds or replaces a certificate.
    pub fn put(&self, record: &CertificateRecord) {
        let (Some(key), Some(public_key)) = (
            SerialKey::of(&record.serial),
            public_key(&record.public_key_hex),
        ) else {
            tracing::error!(serial = %record.serial, "certificate not cacheable");
            return;
        };
        let entry = Entry::new(
            public_key,
            &record.customer_id,
            &record.device_id,
            record.not_before_s,
            record.not_after_s,
            record.revocation,
        );
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Box::new(entry));
    }

    /// Sets (or clears, with `None`) the revocation of known serials.
    pub fn set_revocation(&self, serials: &[Serial], revocation: Option<Revocation>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for key in serials.iter().filter_map(SerialKey::of) {
            if let Some(entry) = map.get_mut(&key) {
                entry.revocation = revocation;
            }
        }
    }

    /// Forgets deleted certificates.
    pub fn remove(&self, serials: &[Serial]) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for key in serials.iter().filter_map(SerialKey::of) {
            map.remove(&key);
        }
    }

    /// Certificates by status name at `now_s`.
    pub fn count_by_status(&self, now_s: i64) -> Vec<(&'static str, usize)> {
        use super::status::{CertificateStatus, StatusView};
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut counts = [0usize; 6];
        for cert in map.values() {
            let view = StatusView::at(cert.not_before_s, cert.not_after_s, cert.revocation, now_s);
            let index = match view.status {
                CertificateStatus::Valid => 0,
                CertificateStatus::Revoked => 1,
                CertificateStatus::Expired => 2,
                CertificateStatus::Superseded => 3,
                CertificateStatus::OnHold => 4,
                CertificateStatus::NotYetValid => 5,
            };
            counts[index] += 1;
        }
        [
            "valid",
            "revoked",
            "expired",
            "superseded",
            "on_hold",
            "not_yet_valid",
        ]
        .into_iter()
        .zip(counts)
        .collect()
    }

    /// How many certificates are cached.
    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
