//! Replay protection: (serial, nonce) pairs seen within the skew window, in memory. The
//! durable side is the decision log, whose records carry the nonce they claimed; this set is
//! rebuilt from the records inside the nonce horizon at start, so a replay is refused across
//! restarts.

use std::collections::HashMap;
use std::sync::Mutex;

/// Claimed nonce keys with their expiry (Unix ms).
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<Vec<u8>, i64>>,
}

impl ReplayGuard {
    /// A guard that already knows `entries` (from storage).
    pub fn with(entries: Vec<(Vec<u8>, i64)>) -> ReplayGuard {
        ReplayGuard {
            seen: Mutex::new(entries.into_iter().collect()),
        }
    }

    /// Claims `key` until `expires_at_ms`; false if it was claimed already. Atomic: of two
    /// concurrent claims of one key exactly one succeeds.
    pub fn claim(&self, key: Vec<u8>, expires_at_ms: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(expires_at_ms);
                true
            }
        }
    }

    /// Gives back a claim whose durable write failed.
    pub fn unclaim(&self, key: &[u8]) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Forgets claims that expired at or before `now_ms`; returns how many.
    pub fn purge(&self, now_ms: i64) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = seen.len();
        seen.retain(|_, expires| *expires > now_ms);
        before - seen.len()
    }
}
