//! One device key, one device: payra refuses to certify a key that already has a live
//! certificate for another customer or device. A renewal may keep its key (same customer,
//! same device); a phone that enrolls again for the same customer and device may too.
//!
//! A key once revoked for keyCompromise is never certified again.
//!
//! The check reads the verification cache's key index ([`super::cache::CertificateCache::key_holders`]),
//! and a key stays claimed here from the check until its certificate is in that index (or the
//! request failed), so two concurrent requests cannot both certify one key for different
//! holders.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::cache::CertificateCache;
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId};

/// Keys being certified right now, with their holder and how many requests claim them.
#[derive(Default)]
pub struct KeysInFlight {
    claims: Mutex<HashMap<[u8; 65], (CustomerId, DeviceId, usize)>>,
}

/// A key claimed for one holder; given back when dropped.
pub struct KeyClaim {
    keys: Arc<KeysInFlight>,
    key: [u8; 65],
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        let mut claims = self.keys.claims.lock().unpoisoned();
        if let Some((_, _, count)) = claims.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                claims.remove(&self.key);
            }
        }
    }
}

/// A key reported compromised.
pub(super) fn compromised() -> Error {
    Error::AlreadyExists("this device key was reported compromised; generate a new key pair".into())
}

pub(super) fn conflict() -> Error {
    Error::AlreadyExists(
        "this device key already has a live certificate for another customer or device; \
         generate a new key pair for this enrollment"
            .into(),
    )
}

impl KeysInFlight {
    /// Claims `key` for `customer` / `device`, refusing it when a live certificate (valid or
    /// on hold, at `now_s`) or a request in flight holds it for someone else.
    pub fn claim(
        self: &Arc<Self>,
        cache: &CertificateCache,
        key: &[u8; 65],
        customer: &CustomerId,
        device: &DeviceId,
        now_s: i64,
    ) -> Result<KeyClaim> {
        let mut claims = self.claims.lock().unpoisoned();
        let standing = cache.key_standing(key, now_s);
        if standing.compromised {
            tracing::warn!(customer = %customer, "refused to certify a key reported compromised");
            return Err(compromised());
        }
        if let Some((serial, holder_customer, holder_device)) = standing.live_holder {
            if holder_customer != *customer || holder_device != *device {
                tracing::warn!(
                    holder = %serial,
                    customer = %customer,
                    device = %device,
                    "refused to certify a key another customer or device holds"
                );
                return Err(conflict());
            }
        }
        match claims.get_mut(key) {
            Some((c, d, count)) if c == customer && d == device => *count += 1,
            Some(_) => return Err(conflict()),
            None => {
                claims.insert(*key, (customer.clone(), device.clone(), 1));
            }
        }
        Ok(KeyClaim {
            keys: self.clone(),
            key: *key,
        })
    }
}
