//! Replay protection: (serial, nonce) pairs seen within the skew window, in memory. The
//! durable side is the decision log, whose records carry the nonce they claimed; this set is
//! rebuilt from the records inside the nonce horizon at start, so a replay is refused across
//! restarts.
//!
//! A payment peak claims a nonce per verification, so the set must not grow with the length of
//! the peak, nor stall verifications while it is cleaned. Each claim therefore drops a few
//! expired claims from the front of its shard's queue as it goes (claims arrive in about the
//! order they expire), which keeps the set at the claims of the last one or two skew windows;
//! and the set is split into shards with a lock each, so no lock is held over the whole set.
//!
//! A claim is forgotten only once it has expired on both clocks: the wall clock that the
//! intent's timestamp is checked against (after the millisecond of its expiry, when that
//! check refuses the intent anyway), and the monotonic clock (after as much real time as it
//! had left when claimed). A wall clock stepped forward and back again therefore cannot
//! make the set forget a claim, made before the step, that the timestamp check would still
//! accept. (A claim made while the clock is already ahead is timed by that clock; a restart
//! starts the monotonic clock again. Neither is covered: keep the clock disciplined.)
//!
//! The clocks are read under the shard's lock, when the claim is made: a claim that another
//! claim dropped as expired had expired by that claim's reading, which came first, so a
//! replay that reaches the lock after it finds its own window passed too and is refused.
//! (Read before the signature check, as the timestamp check reads it, the clock could lag
//! the drop by the length of that check, and a replay could slip into the gap.) This
//! relies on the wall clock not going back between two readings; a claim is therefore
//! dropped only [`DROP_GRACE_MS`] after its expiry, which covers a step back of up to that
//! (a leap second, a virtual machine's clock corrected after a pause).
//!
//! A claim is held as a 128-bit keyed digest of its (serial, nonce) key rather than the key
//! itself: fixed-size entries and no allocation per claim. The digest is HMAC-SHA-256,
//! truncated, under a 256-bit key drawn at random when the guard is made, so nobody can
//! choose two keys whose digests collide; by chance, two different keys collide with
//! probability about 2⁻¹²⁸.

use crate::sync::Unpoisoned;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::clock::Clock;

/// A claim's key digest: two 64-bit halves (not a `u128`, whose 16-byte alignment would pad
/// every entry to 32 bytes).
type Digest = [u64; 2];

/// The two clocks a claim is timed on (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Unix ms, as the intents' timestamps.
    pub wall_ms: i64,
    /// [`Clock::monotonic_ms`].
    pub monotonic_ms: i64,
}

impl Moment {
    /// Now, on both of `clock`'s clocks.
    pub fn of(clock: &dyn Clock) -> Moment {
        Moment {
            wall_ms: clock.now_ms(),
            monotonic_ms: clock.monotonic_ms(),
        }
    }
}

/// A claim in its shard's queue: when it expires on each clock, and its digest.
#[derive(Clone, Copy)]
struct Queued {
    expires_at_ms: i64,
    held_until_monotonic_ms: i64,
    digest: Digest,
}

impl Queued {
    fn new(expires_at_ms: i64, digest: Digest, now: Moment) -> Queued {
        Queued {
            expires_at_ms,
            held_until_monotonic_ms: now
                .monotonic_ms
                .saturating_add(expires_at_ms.saturating_sub(now.wall_ms).max(0)),
            digest,
        }
    }

    /// Whether it has expired on both clocks, `grace_ms` ago.
    fn expired(&self, now: Moment, grace_ms: i64) -> bool {
        self.expires_at_ms.saturating_add(grace_ms) < now.wall_ms
            && self.held_until_monotonic_ms.saturating_add(grace_ms) < now.monotonic_ms
    }
}

/// Shards of the set, each behind its own lock.
const SHARDS: usize = 16;
/// How long after its expiry, on both clocks, a claim is still held (see the module's
/// documentation): about 1.7 % more claims held with the default 120 s skew.
pub const DROP_GRACE_MS: i64 = 2_000;
/// Expired claims a new claim may drop from its shard's queue: more than one, so the set
/// shrinks after a peak as well as keeping up during it.
const DROPS_PER_CLAIM: usize = 4;

/// One shard: claimed digests with their expiry (Unix ms), and the same claims in the order
/// they were made.
#[derive(Default)]
struct Shard {
    expiry: HashMap<Digest, i64>,
    order: VecDeque<Queued>,
}

impl Shard {
    /// Drops up to `limit` claims from the front of the queue that have expired by `now`;
    /// returns how many left the set. A claim that expires later than the one behind it
    /// keeps that one waiting: it is forgotten late, never early.
    fn drop_expired(&mut self, now: Moment, grace_ms: i64, limit: usize) -> usize {
        let mut dropped = 0;
        for _ in 0..limit {
            match self.order.front() {
                Some(&queued) if queued.expired(now, grace_ms) => {
                    self.order.pop_front();
                    // A claim given back and made again, or loaded twice with another expiry,
                    // has a later entry of its own.
                    if self.expiry.get(&queued.digest) == Some(&queued.expires_at_ms) {
                        self.expiry.remove(&queued.digest);
                        dropped += 1;
                    }
                }
                _ => break,
            }
        }
        dropped
    }
}

/// What became of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed until its expiry.
    Claimed,
    /// Claimed before and still held: a replay.
    Replayed,
    /// Its expiry had passed when the clock was read under the lock (at `now_ms`, Unix ms):
    /// the intent's window closed while it was being checked.
    TooLate { now_ms: i64 },
}

/// Claimed nonce keys with their expiry (Unix ms).
pub struct ReplayGuard {
    shards: Vec<Mutex<Shard>>,
    digest_key: ring::hmac::Key,
    drop_grace_ms: i64,
}

impl Default for ReplayGuard {
    fn default() -> ReplayGuard {
        ReplayGuard::new(DROP_GRACE_MS)
    }
}

impl ReplayGuard {
    /// An empty guard that holds claims `drop_grace_ms` past their expiry.
    pub fn new(drop_grace_ms: i64) -> ReplayGuard {
        ReplayGuard {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            digest_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()),
            drop_grace_ms,
        }
    }

    /// A guard that already knows `entries` (from storage), at `now`.
    pub fn with(entries: Vec<(Vec<u8>, i64)>, now: Moment) -> ReplayGuard {
        ReplayGuard::default().load(entries, now)
    }

    /// This guard, knowing `entries` as well, at `now`.
    fn load(self, mut entries: Vec<(Vec<u8>, i64)>, now: Moment) -> ReplayGuard {
        // In expiry order, so that each shard's queue starts in the order it is dropped.
        entries.sort_unstable_by_key(|(_, expires_at_ms)| *expires_at_ms);
        for (key, expires_at_ms) in entries {
            let (shard, digest) = self.locate(&key);
            let mut shard = self.lock(shard);
            // A key loaded twice keeps its later expiry; the earlier entry is skipped.
            let expires_at_ms = shard
                .expiry
                .get(&digest)
                .map_or(expires_at_ms, |&held| held.max(expires_at_ms));
            shard.expiry.insert(digest, expires_at_ms);
            shard
                .order
                .push_back(Queued::new(expires_at_ms, digest, now));
        }
        self
    }

    fn locate(&self, key: &[u8]) -> (usize, Digest) {
        let tag = ring::hmac::sign(&self.digest_key, key);
        let bytes = tag.as_ref();
        let half = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let digest = [half(0), half(8)];
        ((digest[0] >> 60) as usize % SHARDS, digest)
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard].lock().unpoisoned()
    }

    /// Claims `key` until `expires_at_ms` (Unix ms, that millisecond included), reading
    /// `now` under the shard's lock. A claim is held at least until it has expired (see the
    /// module's documentation), and may be held a while longer: refusing such a late intent
    /// is right anyway, as its timestamp is out of the skew window by then. Atomic: of two
    /// concurrent claims of one key exactly one succeeds. Drops a few expired claims of the
    /// same shard on the way.
    pub fn claim(&self, key: &[u8], expires_at_ms: i64, now: impl FnOnce() -> Moment) -> Claim {
        let (shard, digest) = self.locate(key);
        let mut shard = self.lock(shard);
        let now = now();
        shard.drop_expired(now, self.drop_grace_ms, DROPS_PER_CLAIM);
        if shard.expiry.contains_key(&digest) {
            return Claim::Replayed;
        }
        if expires_at_ms < now.wall_ms {
            return Claim::TooLate {
                now_ms: now.wall_ms,
            };
        }
        shard.expiry.insert(digest, expires_at_ms);
        shard
            .order
            .push_back(Queued::new(expires_at_ms, digest, now));
        Claim::Claimed
    }

    /// Gives back a claim of `key` until `expires_at_ms` whose durable write failed. If it
    /// was dropped meanwhile and the key claimed again by another intent (with another
    /// expiry), that claim stays.
    pub fn unclaim(&self, key: &[u8], expires_at_ms: i64) {
        let (shard, digest) = self.locate(key);
        let mut shard = self.lock(shard);
        // Its queue entry stays and is skipped when it reaches the front.
        if shard.expiry.get(&digest) == Some(&expires_at_ms) {
            shard.expiry.remove(&digest);
        }
    }

    /// Forgets claims that have expired by `now`, except any queued behind a claim that
    /// expires later (the next claims of their shard drop them); returns how many.
    pub fn purge(&self, now: Moment) -> usize {
        (0..SHARDS)
            .map(|shard| {
                self.lock(shard)
                    .drop_expired(now, self.drop_grace_ms, usize::MAX)
            })
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

    fn claimed(guard: &ReplayGuard, key: &[u8], expires_at_ms: i64, now: Moment) -> bool {
        guard.claim(key, expires_at_ms, || now) == Claim::Claimed
    }

    fn replayed(guard: &ReplayGuard, key: &[u8], expires_at_ms: i64, now: Moment) -> bool {
        guard.claim(key, expires_at_ms, || now) == Claim::Replayed
    }

    /// Both clocks at `ms`, as when the wall clock has never been set.
    fn at(ms: i64) -> Moment {
        Moment {
            wall_ms: ms,
            monotonic_ms: ms,
        }
    }

    #[test]
    fn a_key_is_refused_until_it_expires_then_claimable_again() {
        let guard = ReplayGuard::new(0);
        assert!(claimed(&guard, &key(1), 1_000, at(0)));
        assert!(replayed(&guard, &key(1), 1_000, at(999)));
        assert!(
            claimed(&guard, &key(2), 1_000, at(999)),
            "another key is its own"
        );
        assert_eq!(guard.purge(at(1_000)), 0, "nothing expired yet");
        assert_eq!(guard.purge(at(1_001)), 2);
        assert_eq!(guard.held(), 0);
        assert!(claimed(&guard, &key(1), 2_000, at(1_001)));
    }

    #[test]
    fn a_claim_is_still_held_in_the_millisecond_it_expires() {
        // The timestamp check still accepts an intent at created_at + skew, its claim's
        // expiry: a replay in that millisecond must find the claim, even when it is first in
        // its shard's queue and the replay's own claim drops what has expired.
        let guard = ReplayGuard::new(0);
        assert!(claimed(&guard, &key(1), 1_000, at(0)));
        assert!(replayed(&guard, &key(1), 1_000, at(1_000)));
        assert!(claimed(&guard, &key(1), 2_001, at(1_001)));
    }

    #[test]
    fn a_replay_reaching_the_lock_after_its_claim_was_dropped_is_too_late() {
        // Another claim in the same shard, made after the expiry, drops the first claim. A
        // replay checked before that expiry but reaching the lock after the drop reads the
        // clock there, later than the drop's reading: its window has passed.
        let guard = ReplayGuard::new(0);
        let shard = guard.locate(&key(1)).0;
        let neighbour = (2..).find(|&i| guard.locate(&key(i)).0 == shard).unwrap();
        assert!(claimed(&guard, &key(1), 1_000, at(0)));
        assert!(claimed(&guard, &key(neighbour), 5_000, at(1_001)));
        assert_eq!(guard.held(), 1, "the first claim was dropped");
        let outcome = guard.claim(&key(1), 1_000, || {
            assert!(
                guard.shards[shard].try_lock().is_err(),
                "the clock is read under the shard's lock"
            );
            at(1_001)
        });
        assert_eq!(outcome, Claim::TooLate { now_ms: 1_001 });
        assert_eq!(guard.held(), 1, "a late claim is not made");
    }

    #[test]
    fn a_claim_given_back_late_leaves_another_intents_claim_of_the_key() {
        let guard = ReplayGuard::new(0);
        assert!(claimed(&guard, &key(7), 1_000, at(0)));
        // Its write is slow; meanwhile it expires, is dropped, and another intent with the
        // same nonce claims the key until 5,000.
        assert_eq!(guard.purge(at(1_001)), 1);
        assert!(claimed(&guard, &key(7), 5_000, at(1_001)));
        // The first write fails: giving its claim back must not free the second one's.
        guard.unclaim(&key(7), 1_000);
        assert!(replayed(&guard, &key(7), 5_000, at(1_002)));
    }

    #[test]
    fn a_claim_is_held_a_grace_period_past_its_expiry() {
        let guard = ReplayGuard::default();
        assert!(claimed(&guard, &key(1), 1_000, at(0)));
        assert_eq!(guard.purge(at(1_000 + DROP_GRACE_MS)), 0);
        // The wall clock goes back a second, as after a leap second: the intent is inside
        // its window again, and its claim is still there.
        let back = Moment {
            wall_ms: 1_000,
            monotonic_ms: 1_000 + DROP_GRACE_MS,
        };
        assert!(replayed(&guard, &key(1), 1_000, back));
        assert_eq!(guard.purge(at(1_001 + DROP_GRACE_MS)), 1);
    }

    #[test]
    fn a_wall_clock_stepped_forward_and_back_does_not_forget_a_claim() {
        let guard = ReplayGuard::new(0);
        assert!(claimed(&guard, &key(1), 120_000, at(0)));
        // The wall clock is set 100 s ahead, 10 ms later; claims made then drop what has
        // expired by the wall clock alone.
        let ahead = Moment {
            wall_ms: 200_010,
            monotonic_ms: 10,
        };
        for i in 2..100 {
            assert!(claimed(&guard, &key(i), 320_010, ahead));
        }
        assert_eq!(guard.purge(ahead), 0);
        // Set back: the intent is inside the skew window again, and still refused.
        let back = Moment {
            wall_ms: 20,
            monotonic_ms: 20,
        };
        assert!(replayed(&guard, &key(1), 120_000, back));
    }

    #[test]
    fn a_claim_made_while_the_wall_clock_is_ahead_is_held_until_the_corrected_clock_passes_it() {
        let guard = ReplayGuard::new(0);
        // Claimed with the wall clock 100 s ahead: 20 s left by that clock.
        let ahead = Moment {
            wall_ms: 100_000,
            monotonic_ms: 0,
        };
        assert!(claimed(&guard, &key(1), 120_000, ahead));
        // 25 s later the clock is corrected to 25,000: the monotonic 20 s have passed, but
        // by the wall clock the intent is still inside its window.
        let corrected = Moment {
            wall_ms: 25_000,
            monotonic_ms: 25_000,
        };
        assert_eq!(guard.purge(corrected), 0);
        assert!(replayed(&guard, &key(1), 120_000, corrected));
        assert_eq!(guard.purge(at(120_001)), 1);
    }

    #[test]
    fn a_steady_stream_of_claims_holds_only_the_live_window() {
        // 20 claims per ms, each live for 1,000 ms, for 10,000 ms: without dropping as it
        // goes the set would hold all 200,000.
        let guard = ReplayGuard::new(0);
        let mut i = 0;
        for now_ms in 0..10_000i64 {
            for _ in 0..20 {
                assert!(claimed(&guard, &key(i), now_ms + 1_000, at(now_ms)));
                i += 1;
            }
        }
        let held = guard.held();
        assert!(
            (20_000..=20_400).contains(&held),
            "held {held} claims, expected about one window's 20,000"
        );
        // Within the window every claim is still refused.
        for back in 0..20_000 {
            assert!(replayed(&guard, &key(i - 1 - back), 11_000, at(9_999)));
        }
    }

    #[test]
    fn after_a_peak_the_set_drains_with_the_next_claims() {
        let guard = ReplayGuard::new(0);
        for i in 0..10_000 {
            assert!(claimed(&guard, &key(i), 1_000, at(0)));
        }
        // Long after the peak, a trickle of claims empties it (no retention run needed).
        for i in 0..10_000 {
            guard.claim(&key(1_000_000 + i), 100_000, || at(50_000));
        }
        assert_eq!(
            guard.held(),
            10_000,
            "only the trickle's own claims are left"
        );
    }

    #[test]
    fn a_claim_given_back_and_made_again_lives_to_its_new_expiry() {
        let guard = ReplayGuard::new(0);
        assert!(claimed(&guard, &key(7), 1_000, at(0)));
        guard.unclaim(&key(7), 1_000);
        assert!(claimed(&guard, &key(7), 5_000, at(10)));
        // The first claim's queue entry reaches the front after 1,000 and must not drop the
        // second claim.
        assert_eq!(guard.purge(at(1_001)), 0);
        assert!(replayed(&guard, &key(7), 5_000, at(1_001)));
        assert_eq!(guard.purge(at(5_001)), 1);
    }

    #[test]
    fn a_claim_is_never_dropped_before_its_expiry_whatever_the_order() {
        let guard = ReplayGuard::new(0);
        // Claims expiring late and early interleaved, so some late ones are queued in front
        // of early ones.
        for i in 0..64 {
            assert!(claimed(
                &guard,
                &key(i),
                if i % 2 == 0 { 10_000 } else { 1_000 },
                at(0)
            ));
        }
        guard.purge(at(1_001));
        for i in (0..64).step_by(2) {
            assert!(
                replayed(&guard, &key(i), 20_000, at(1_001)),
                "key {i} expires at 10,000"
            );
        }
    }

    #[test]
    fn known_claims_from_storage_are_refused_and_expire() {
        let guard = ReplayGuard::new(0).load(
            vec![(key(3), 2_000), (key(1), 1_000), (key(3), 2_000)],
            at(0),
        );
        assert_eq!(guard.held(), 2);
        assert!(replayed(&guard, &key(1), 1_500, at(500)));
        assert!(replayed(&guard, &key(3), 2_500, at(500)));
        assert_eq!(guard.purge(at(2_001)), 2);
    }

    #[test]
    fn a_key_loaded_twice_keeps_its_later_expiry_and_still_leaves() {
        let guard = ReplayGuard::new(0).load(vec![(key(5), 2_000), (key(5), 1_000)], at(0));
        assert_eq!(guard.purge(at(1_500)), 0);
        assert!(replayed(&guard, &key(5), 3_000, at(1_500)));
        assert_eq!(guard.purge(at(2_001)), 1);
        assert_eq!(guard.held(), 0);
    }

    #[test]
    fn of_concurrent_claims_of_one_key_exactly_one_wins() {
        let guard = std::sync::Arc::new(ReplayGuard::new(0));
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        // All eight threads exist before any is joined, so they race at the barrier.
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (guard, start) = (guard.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..1_000)
                        .filter(|&i| claimed(&guard, &key(i), 1_000, at(0)))
                        .count()
                })
            })
            .collect();
        let wins: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(wins, 1_000, "each of the 1,000 keys claimed exactly once");
    }
}
