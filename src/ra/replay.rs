//! Replay protection: (serial, nonce) pairs seen within the skew window, in memory. The
//! durable side is the decision log, whose records carry the nonce they claimed; this set is
//! rebuilt from the records inside the nonce horizon at start, so a replay is refused across
//! restarts.
//!
//! A payment peak claims a nonce per verification, so the set must not grow with the length of
//! the peak, nor stall verifications while it is cleaned. Each claim therefore drops a few
//! expired claims from the front of its shard's queue as it goes (claims arrive in about the
//! order they expire), which keeps the set at about the claims of the last skew window; and
//! the set is split into shards with a lock each, so no lock is held over the whole set.
//!
//! A claim is held as a 128-bit keyed digest of its (serial, nonce) key rather than the key
//! itself: fixed-size entries and no allocation per claim. The digest's two 64-bit SipHash
//! keys are drawn at random when the guard is made, so nobody can choose two keys whose
//! digests collide; by chance, two different keys collide with probability about 2⁻¹²⁸.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;

/// A claim's key digest: two 64-bit halves (not a `u128`, whose 16-byte alignment would pad
/// every entry to 32 bytes).
type Digest = [u64; 2];

/// Shards of the set, each behind its own lock.
const SHARDS: usize = 16;
/// Expired claims a new claim may drop from its shard's queue: more than one, so the set
/// shrinks after a peak as well as keeping up during it.
const DROPS_PER_CLAIM: usize = 4;

/// One shard: claimed digests with their expiry (Unix ms), and the same claims in the order
/// they were made.
#[derive(Default)]
struct Shard {
    expiry: HashMap<Digest, i64>,
    order: VecDeque<(i64, Digest)>,
}

impl Shard {
    /// Drops up to `limit` claims from the front of the queue that expired at or before
    /// `now_ms`; returns how many left the set. A claim that expires later than the one
    /// behind it keeps that one waiting: it is forgotten late, never early.
    fn drop_expired(&mut self, now_ms: i64, limit: usize) -> usize {
        let mut dropped = 0;
        for _ in 0..limit {
            match self.order.front() {
                Some(&(expires_at_ms, digest)) if expires_at_ms <= now_ms => {
                    self.order.pop_front();
                    // A claim given back and made again has a newer entry of its own.
                    if self.expiry.get(&digest) == Some(&expires_at_ms) {
                        self.expiry.remove(&digest);
                        dropped += 1;
                    }
                }
                _ => break,
            }
        }
        dropped
    }
}

/// Claimed nonce keys with their expiry (Unix ms).
pub struct ReplayGuard {
    shards: Vec<Mutex<Shard>>,
    high: RandomState,
    low: RandomState,
}

impl Default for ReplayGuard {
    fn default() -> ReplayGuard {
        ReplayGuard {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            high: RandomState::new(),
            low: RandomState::new(),
        }
    }
}

impl ReplayGuard {
    /// A guard that already knows `entries` (from storage).
    pub fn with(mut entries: Vec<(Vec<u8>, i64)>) -> ReplayGuard {
        let guard = ReplayGuard::default();
        // In expiry order, so that each shard's queue starts in the order it is dropped.
        entries.sort_unstable_by_key(|(_, expires_at_ms)| *expires_at_ms);
        for (key, expires_at_ms) in entries {
            let (shard, digest) = guard.locate(&key);
            let mut shard = guard.lock(shard);
            if shard.expiry.insert(digest, expires_at_ms).is_none() {
                shard.order.push_back((expires_at_ms, digest));
            }
        }
        guard
    }

    fn locate(&self, key: &[u8]) -> (usize, Digest) {
        let high = self.high.hash_one(key);
        let digest = [high, self.low.hash_one(key)];
        ((high >> 60) as usize % SHARDS, digest)
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` until `expires_at_ms`; false if it was claimed already and has not
    /// expired by `now_ms`. Atomic: of two concurrent claims of one key exactly one
    /// succeeds. Drops a few expired claims of the same shard on the way.
    pub fn claim(&self, key: &[u8], expires_at_ms: i64, now_ms: i64) -> bool {
        let (shard, digest) = self.locate(key);
        let mut shard = self.lock(shard);
        shard.drop_expired(now_ms, DROPS_PER_CLAIM);
        match shard.expiry.entry(digest) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(expires_at_ms);
                shard.order.push_back((expires_at_ms, digest));
                true
            }
        }
    }

    /// Gives back a claim whose durable write failed.
    pub fn unclaim(&self, key: &[u8]) {
        let (shard, digest) = self.locate(key);
        // Its queue entry stays and is skipped when it reaches the front.
        self.lock(shard).expiry.remove(&digest);
    }

    /// Forgets claims that expired at or before `now_ms`, except any queued behind a claim
    /// that expires later (the next claims of their shard drop them); returns how many.
    pub fn purge(&self, now_ms: i64) -> usize {
        (0..SHARDS)
            .map(|shard| self.lock(shard).drop_expired(now_ms, usize::MAX))
            .sum()
    }

    /// How many claims are held.
    pub fn held(&self) -> usize {
        (0..SHARDS).map(|shard| self.lock(shard).expiry.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Vec<u8> {
        let mut key = vec![4];
        key.extend_from_slice(&i.to_be_bytes());
        key.extend_from_slice(b"nonce");
        key
    }

    #[test]
    fn a_key_is_refused_until_it_expires_then_claimable_again() {
        let guard = ReplayGuard::default();
        assert!(guard.claim(&key(1), 1_000, 0));
        assert!(!guard.claim(&key(1), 1_000, 999));
        assert!(guard.claim(&key(2), 1_000, 999), "another key is its own");
        assert_eq!(guard.purge(999), 0, "nothing expired yet");
        assert_eq!(guard.purge(1_000), 2);
        assert_eq!(guard.held(), 0);
        assert!(guard.claim(&key(1), 2_000, 1_000));
    }

    #[test]
    fn a_steady_stream_of_claims_holds_only_the_live_window() {
        // 20 claims per ms, each live for 1,000 ms, for 10,000 ms: without dropping as it
        // goes the set would hold all 200,000.
        let guard = ReplayGuard::default();
        let mut i = 0;
        for now_ms in 0..10_000i64 {
            for _ in 0..20 {
                assert!(guard.claim(&key(i), now_ms + 1_000, now_ms));
                i += 1;
            }
        }
        let held = guard.held();
        assert!(
            (20_000..=20_200).contains(&held),
            "held {held} claims, expected about one window's 20,000"
        );
        // Within the window every claim is still refused.
        for back in 0..20_000 {
            assert!(!guard.claim(&key(i - 1 - back), 11_000, 9_999));
        }
    }

    #[test]
    fn after_a_peak_the_set_drains_with_the_next_claims() {
        let guard = ReplayGuard::default();
        for i in 0..10_000 {
            assert!(guard.claim(&key(i), 1_000, 0));
        }
        // Long after the peak, a trickle of claims empties it (no retention run needed).
        for i in 0..10_000 {
            guard.claim(&key(1_000_000 + i), 100_000, 50_000);
        }
        assert_eq!(
            guard.held(),
            10_000,
            "only the trickle's own claims are left"
        );
    }

    #[test]
    fn a_claim_given_back_and_made_again_lives_to_its_new_expiry() {
        let guard = ReplayGuard::default();
        assert!(guard.claim(&key(7), 1_000, 0));
        guard.unclaim(&key(7));
        assert!(guard.claim(&key(7), 5_000, 10));
        // The first claim's queue entry reaches the front at 1,000 and must not drop the
        // second claim.
        assert_eq!(guard.purge(1_000), 0);
        assert!(!guard.claim(&key(7), 5_000, 1_001));
        assert_eq!(guard.purge(5_000), 1);
    }

    #[test]
    fn a_claim_is_never_dropped_before_its_expiry_whatever_the_order() {
        let guard = ReplayGuard::default();
        // Claims expiring late and early interleaved, so some late ones are queued in front
        // of early ones.
        for i in 0..64 {
            assert!(guard.claim(&key(i), if i % 2 == 0 { 10_000 } else { 1_000 }, 0));
        }
        guard.purge(1_000);
        for i in (0..64).step_by(2) {
            assert!(
                !guard.claim(&key(i), 20_000, 1_000),
                "key {i} expires at 10,000"
            );
        }
    }

    #[test]
    fn known_claims_from_storage_are_refused_and_expire() {
        let guard = ReplayGuard::with(vec![(key(3), 2_000), (key(1), 1_000), (key(3), 2_000)]);
        assert_eq!(guard.held(), 2);
        assert!(!guard.claim(&key(1), 1_500, 500));
        assert!(!guard.claim(&key(3), 2_500, 500));
        assert_eq!(guard.purge(2_000), 2);
    }

    #[test]
    fn of_concurrent_claims_of_one_key_exactly_one_wins() {
        let guard = std::sync::Arc::new(ReplayGuard::default());
        let wins: usize = (0..8)
            .map(|_| {
                let guard = guard.clone();
                std::thread::spawn(move || guard.claim(&key(42), 1_000, 0) as usize)
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(wins, 1);
    }
}
