//! The in-memory view of every certificate the verifier needs: key, identity, validity and
//! revocation. Loaded at start, updated after each durable change and before the change is
//! acknowledged, so the hot path reads no disk and a revocation is effective for the very
//! next verification.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::Result;
use crate::model::{CustomerId, DeviceId, Serial};
use crate::store::{CertificateRecord, Revocation, Store};

/// What the verifier knows about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedCertificate {
    /// Uncompressed SEC1 P-256 point, inline (no allocation per certificate).
    pub public_key: [u8; 65],
    pub customer: CustomerId,
    pub device: DeviceId,
    pub not_before_s: i64,
    pub not_after_s: i64,
    pub revocation: Option<Revocation>,
}

fn public_key(hex_text: &str) -> Option<[u8; 65]> {
    let mut key = [0u8; 65];
    hex::decode_to_slice(hex_text, &mut key).ok()?;
    Some(key)
}

impl CachedCertificate {
    fn of(record: &CertificateRecord) -> Option<CachedCertificate> {
        Some(CachedCertificate {
            public_key: public_key(&record.public_key_hex)?,
            customer: record.customer_id.clone(),
            device: record.device_id.clone(),
            not_before_s: record.not_before_s,
            not_after_s: record.not_after_s,
            revocation: record.revocation,
        })
    }
}

/// serial → certificate facts, shared by all request threads.
#[derive(Default)]
pub struct CertificateCache {
    map: RwLock<HashMap<Serial, Arc<CachedCertificate>>>,
}

impl CertificateCache {
    /// Reads every certificate from `store`.
    pub fn load(store: &dyn Store) -> Result<CertificateCache> {
        let mut map = HashMap::new();
        store.for_each_certificate_summary(&mut |summary| {
            let Some(key) = public_key(&summary.public_key_hex) else {
                tracing::error!(serial = %summary.serial, "stored public key is not a P-256 point");
                return;
            };
            map.insert(
                summary.serial,
                Arc::new(CachedCertificate {
                    public_key: key,
                    customer: summary.customer_id,
                    device: summary.device_id,
                    not_before_s: summary.not_before_s,
                    not_after_s: summary.not_after_s,
                    revocation: summary.revocation,
                }),
            );
        })?;
        Ok(CertificateCache {
            map: RwLock::new(map),
        })
    }

    /// The facts about `serial`, if payra issued it.
    pub fn get(&self, serial: &Serial) -> Option<Arc<CachedCertificate>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(serial)
            .cloned()
    }

    /// Adds or replaces a certificate.
    pub fn put(&self, record: &CertificateRecord) {
        if let Some(entry) = CachedCertificate::of(record) {
            self.map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(record.serial.clone(), Arc::new(entry));
        }
    }

    /// Sets (or clears, with `None`) the revocation of known serials.
    pub fn set_revocation(&self, serials: &[Serial], revocation: Option<Revocation>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for serial in serials {
            if let Some(entry) = map.get(serial) {
                let mut updated = CachedCertificate::clone(entry);
                updated.revocation = revocation;
                map.insert(serial.clone(), Arc::new(updated));
            }
        }
    }

    /// Forgets deleted certificates.
    pub fn remove(&self, serials: &[Serial]) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for serial in serials {
            map.remove(serial);
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
