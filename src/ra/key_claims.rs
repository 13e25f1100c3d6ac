//! One device key, one device: payra refuses to certify a key that already has a live
//! certificate for another customer or device. A renewal may keep its key (same customer,
//! same device); a phone that enrolls again for the same customer and device may too.
//!
//! A key once revoked for keyCompromise is never certified again.
//!
//! The check reads every certificate of the key from the store
//! ([`crate::store::Store::certificates_with_key`]). A key is claimed here before that read
//! and stays claimed until its new certificate is in the store (or the request failed), so
//! two concurrent requests of this process cannot both certify one key for different
//! holders: the later claim is refused, or its read sees the earlier certificate. (A store
//! several processes share checks again as it commits.)

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::model::{CustomerId, DeviceId};
use crate::store::{KeyRefusal, Store};

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

impl KeysInFlight {
    /// Whether no key is claimed now (tests).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.claims.lock().unpoisoned().is_empty()
    }

    /// Claims `key` for `customer` / `device`, refusing it when a live certificate (valid or
    /// on hold, at `now_s`) or a request in flight holds it for someone else.
    pub fn claim(
        self: &Arc<Self>,
        store: &dyn Store,
        key: &[u8; 65],
        customer: &CustomerId,
        device: &DeviceId,
        now_s: i64,
    ) -> Result<KeyClaim> {
        {
            let mut claims = self.claims.lock().unpoisoned();
            match claims.get_mut(key) {
                Some((c, d, count)) if c == customer && d == device => *count += 1,
                Some(_) => return Err(KeyRefusal::held_elsewhere_error()),
                None => {
                    claims.insert(*key, (customer.clone(), device.clone(), 1));
                }
            }
        }
        // Claimed before the read; given back (dropped) on a refusal.
        let claim = KeyClaim {
            keys: self.clone(),
            key: *key,
        };
        let holders = store.certificates_with_key(key)?;
        let Some(refusal) = KeyRefusal::of(&holders, customer, device, now_s) else {
            return Ok(claim);
        };
        match &refusal {
            KeyRefusal::Compromised => {
                tracing::warn!(customer = %customer, "refused to certify a key reported compromised")
            }
            KeyRefusal::HeldElsewhere(holder) => tracing::warn!(
                holder = %holder,
                customer = %customer,
                device = %device,
                "refused to certify a key another customer or device holds"
            ),
        }
        Err(refusal.error())
    }
}
