//! The certificate facts the verifier needs (key, identity, validity, revocation), kept for
//! the certificates verified lately in a cache of bounded size, with the store as the source
//! of truth behind it: a replica's memory does not grow with the number of devices.
//!
//! Freshness: the cache only ever holds what the store held at some moment, and a change
//! the store has made visible empties the certificate's slot before the change is
//! acknowledged. A lookup that misses takes a ticket (its shard's epoch) before it reads the
//! store; the entry it then fills is dropped if an invalidation touched the shard meanwhile.
//! So a revocation is effective for the very next verification, whether the certificate
//! was cached or not.
//!
//! Eviction is CLOCK: each entry has a referenced bit a hit sets; the hand clears set bits
//! and evicts the first entry it finds clear. A hit takes a shard's read lock only.

use crate::sync::Unpoisoned;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

use crate::attestation::AttestationClass;
use crate::model::{CustomerId, DeviceId, KeyAlgorithm, RevocationReason, Serial};
use crate::store::{CertificateSummary, Revocation};

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
    /// What the enrollment's attestation proved (what the certificate counts for).
    pub attestation: AttestationClass,
    /// P-256 or SM2: how the device signs its payments.
    pub key_algorithm: KeyAlgorithm,
}

impl CachedCertificate {
    /// The facts a stored summary holds.
    pub fn of(summary: &CertificateSummary) -> CachedCertificate {
        CachedCertificate {
            public_key: summary.public_key,
            customer: summary.customer_id.clone(),
            device: summary.device_id.clone(),
            not_before_s: summary.not_before_s,
            not_after_s: summary.not_after_s,
            revocation: summary.revocation,
            attestation: summary.attestation,
            key_algorithm: summary.key_algorithm,
        }
    }
}

/// One certificate as the cache keeps it: a single allocation of about 130 bytes holding
/// the serial, the key, validity, revocation and both identifiers.
///
/// Layout: serial length (1) | serial (up to 20) | public key (65) | notBefore i64 LE |
/// notAfter i64 LE | revocation: reason code + 1, or 0 for none (1) | revoked_at_s i64 LE |
/// attestation class (1) | key algorithm (1) | customer length (1) | customer | device.
struct Entry(Box<[u8]>);

/// The longest serial RFC 5280 allows.
const MAX_SERIAL: usize = 20;
const KEY_LEN: usize = 65;

impl Entry {
    fn new(summary: &CertificateSummary) -> Option<Entry> {
        let serial = summary.serial.as_bytes();
        let customer = summary.customer_id.as_str().as_bytes();
        let device = summary.device_id.as_str().as_bytes();
        if serial.len() > MAX_SERIAL || customer.len() > usize::from(u8::MAX) {
            return None;
        }
        let mut bytes =
            Vec::with_capacity(1 + serial.len() + KEY_LEN + 28 + customer.len() + device.len());
        bytes.push(serial.len() as u8);
        bytes.extend_from_slice(serial);
        bytes.extend_from_slice(&summary.public_key);
        bytes.extend_from_slice(&summary.not_before_s.to_le_bytes());
        bytes.extend_from_slice(&summary.not_after_s.to_le_bytes());
        bytes.extend_from_slice(&[0; 9]);
        bytes.push(summary.attestation.0);
        bytes.push(summary.key_algorithm.code());
        bytes.push(customer.len() as u8);
        bytes.extend_from_slice(customer);
        bytes.extend_from_slice(device);
        let mut entry = Entry(bytes.into_boxed_slice());
        entry.set_revocation(summary.revocation);
        Some(entry)
    }

    fn serial(&self) -> &[u8] {
        &self.0[1..1 + usize::from(self.0[0])]
    }

    /// Where the fields after the serial start.
    fn fixed(&self) -> usize {
        1 + usize::from(self.0[0])
    }

    fn i64_at(&self, at: usize) -> i64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[at..at + 8]);
        i64::from_le_bytes(word)
    }

    fn not_before_s(&self) -> i64 {
        self.i64_at(self.fixed() + KEY_LEN)
    }

    fn not_after_s(&self) -> i64 {
        self.i64_at(self.fixed() + KEY_LEN + 8)
    }

    fn revocation(&self) -> Option<Revocation> {
        let at = self.fixed() + KEY_LEN + 16;
        let code = self.0[at].checked_sub(1)?;
        Some(Revocation {
            revoked_at_s: self.i64_at(at + 1),
            // Only `set_revocation` writes the tag; a code it could not have written still
            // reads as revoked, never as valid.
            reason: RevocationReason::from_code(code).unwrap_or(RevocationReason::Unspecified),
        })
    }

    fn set_revocation(&mut self, revocation: Option<Revocation>) {
        let at = self.fixed() + KEY_LEN + 16;
        let (tag, revoked_at_s) = match revocation {
            Some(r) => (r.reason.code() + 1, r.revoked_at_s),
            None => (0, 0),
        };
        self.0[at] = tag;
        self.0[at + 1..at + 9].copy_from_slice(&revoked_at_s.to_le_bytes());
    }

    fn view(&self) -> CachedCertificate {
        let at = self.fixed();
        let mut public_key = [0u8; KEY_LEN];
        public_key.copy_from_slice(&self.0[at..at + KEY_LEN]);
        let attestation = AttestationClass(self.0[at + KEY_LEN + 25]);
        // Only `new` writes the code, from a KeyAlgorithm.
        let key_algorithm =
            KeyAlgorithm::from_code(self.0[at + KEY_LEN + 26]).unwrap_or(KeyAlgorithm::P256);
        let ids_at = at + KEY_LEN + 27;
        let customer_len = usize::from(self.0[ids_at]);
        let ids = &self.0[ids_at + 1..];
        // Both identifiers were validated (ASCII) before they were stored, so this borrows.
        let text = |bytes| String::from_utf8_lossy(bytes);
        CachedCertificate {
            public_key,
            customer: CustomerId::validated(&text(&ids[..customer_len])),
            device: DeviceId::validated(&text(&ids[customer_len..])),
            not_before_s: self.not_before_s(),
            not_after_s: self.not_after_s(),
            revocation: self.revocation(),
            attestation,
            key_algorithm,
        }
    }
}

/// What one cached certificate costs besides its entry's bytes: the allocator's header, the
/// slot (pointer, length, referenced bit) and the index (a slot number and a control byte at
/// most 7/8 full).
const ENTRY_OVERHEAD: usize = 48;

/// One cached certificate and its CLOCK bit.
struct Slot {
    entry: Option<Entry>,
    referenced: AtomicBool,
}

/// One shard's entries: slots found by serial through `index`, and the CLOCK hand.
#[derive(Default)]
struct Table {
    index: hashbrown::HashTable<u32>,
    slots: Vec<Slot>,
    /// Slots whose entry was invalidated, to be reused first.
    free: Vec<u32>,
    hand: usize,
    /// Entries' bytes plus [`ENTRY_OVERHEAD`] each.
    bytes: usize,
}

impl Table {
    fn find(&self, hash: u64, serial: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&at| {
                slots[at as usize]
                    .entry
                    .as_ref()
                    .is_some_and(|entry| entry.serial() == serial)
            })
            .copied()
    }

    fn cost(entry: &Entry) -> usize {
        entry.0.len() + ENTRY_OVERHEAD
    }

    /// Takes the entry at `at` out of the slot and the index; the slot is reused later.
    fn evict(&mut self, at: u32, hasher: &RandomState) {
        let Some(entry) = self.slots[at as usize].entry.take() else {
            return;
        };
        let hash = hasher.hash_one(entry.serial());
        if let Ok(found) = self.index.find_entry(hash, |&other| other == at) {
            found.remove();
        }
        self.bytes -= Self::cost(&entry);
        self.free.push(at);
    }

    fn remove(&mut self, hash: u64, serial: &[u8], hasher: &RandomState) {
        if let Some(at) = self.find(hash, serial) {
            self.evict(at, hasher);
        }
    }

    /// Evicts entries by CLOCK until `needed` more bytes fit in `budget`; how many went.
    fn make_room(&mut self, needed: usize, budget: usize, hasher: &RandomState) -> u64 {
        let mut evicted = 0;
        // Two turns of the hand find an entry whose bit is clear, if any entry is left.
        let mut steps = 2 * self.slots.len();
        while self.bytes + needed > budget && self.bytes > 0 && steps > 0 {
            steps -= 1;
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let at = self.hand;
            self.hand += 1;
            let slot = &self.slots[at];
            if slot.entry.is_none() {
                continue;
            }
            if slot.referenced.swap(false, Ordering::Relaxed) {
                continue;
            }
            self.evict(at as u32, hasher);
            evicted += 1;
        }
        evicted
    }

    /// Puts `entry` in (replacing one of the same serial), evicting others to keep within
    /// `budget`; how many were evicted. An entry larger than the budget is not kept.
    fn insert(&mut self, hash: u64, entry: Entry, budget: usize, hasher: &RandomState) -> u64 {
        self.remove(hash, entry.serial(), hasher);
        let cost = Self::cost(&entry);
        if cost > budget {
            return 0;
        }
        let evicted = self.make_room(cost, budget, hasher);
        let slot = Slot {
            entry: Some(entry),
            referenced: AtomicBool::new(false),
        };
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = slot;
                at
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, at, |&other| {
            slots[other as usize]
                .entry
                .as_ref()
                .map_or(0, |entry| hasher.hash_one(entry.serial()))
        });
        self.bytes += cost;
        evicted
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

type RandomState = std::collections::hash_map::RandomState;

/// How many tables the cache is split into, each behind its own lock and with its own
/// epoch: an invalidation turns away the fills in flight of 1/64 of the serials.
const SHARDS: usize = 64;

/// The table that holds a serial of this hash. Bits 32–37: hashbrown takes a slot from the
/// low bits and a tag from the top seven, so these leave both spread within a table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

struct Shard {
    table: RwLock<Table>,
    /// Bumped, under the table's write lock, by every invalidation of one of its serials.
    epoch: AtomicU64,
}

/// Counters the cache keeps as it is used (the metrics' counters, or detached ones).
#[derive(Clone)]
pub struct CacheCounters {
    pub hits: prometheus::IntCounter,
    pub misses: prometheus::IntCounter,
    pub evictions: prometheus::IntCounter,
}

impl CacheCounters {
    /// Counters nobody exports (tests).
    #[cfg(test)]
    pub fn detached() -> CacheCounters {
        let counter = |name: &str| {
            prometheus::IntCounter::new(name, name)
                .unwrap_or_else(|e| panic!("counter {name}: {e}"))
        };
        CacheCounters {
            hits: counter("hits"),
            misses: counter("misses"),
            evictions: counter("evictions"),
        }
    }
}

/// What a lookup that missed must hand back with the store's answer: where the serial
/// lives and the epoch its shard had before the store was read.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    hash: u64,
    epoch: u64,
}

/// A lookup's outcome.
pub enum Lookup<T> {
    Hit(T),
    /// Not cached: read the store, then [`CertificateCache::fill`] with this ticket.
    Miss(Ticket),
}

/// serial → certificate facts, for the certificates verified lately, within a byte budget.
pub struct CertificateCache {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Each shard's share of the budget.
    shard_budget: usize,
    counters: CacheCounters,
}

impl CertificateCache {
    /// An empty cache that keeps at most about `budget_bytes` of certificates (0: none).
    pub fn new(budget_bytes: u64, counters: CacheCounters) -> CertificateCache {
        CertificateCache {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    table: RwLock::default(),
                    epoch: AtomicU64::new(0),
                })
                .collect(),
            hasher: RandomState::new(),
            shard_budget: usize::try_from(budget_bytes / SHARDS as u64).unwrap_or(usize::MAX),
            counters,
        }
    }

    /// The hash of `serial` and its shard.
    fn locate(&self, serial: &[u8]) -> (u64, &Shard) {
        let hash = self.hasher.hash_one(serial);
        (hash, &self.shards[shard_of(hash)])
    }

    /// Finds `serial` and reads what `read` takes from its entry; on a miss, the ticket to
    /// fill it with.
    fn look<T>(&self, serial: &Serial, read: impl FnOnce(&Entry) -> T) -> Lookup<T> {
        let (hash, shard) = self.locate(serial.as_bytes());
        let table = shard.table.read().unpoisoned();
        if let Some(at) = table.find(hash, serial.as_bytes()) {
            let slot = &table.slots[at as usize];
            if let Some(entry) = &slot.entry {
                if !slot.referenced.load(Ordering::Relaxed) {
                    slot.referenced.store(true, Ordering::Relaxed);
                }
                self.counters.hits.inc();
                return Lookup::Hit(read(entry));
            }
        }
        self.counters.misses.inc();
        // Read under the table's lock: no invalidation of this shard is half done.
        Lookup::Miss(Ticket {
            hash,
            epoch: shard.epoch.load(Ordering::Acquire),
        })
    }

    /// The facts about `serial`, or the ticket to read them from the store with.
    pub fn get(&self, serial: &Serial) -> Lookup<CachedCertificate> {
        self.look(serial, Entry::view)
    }

    /// Validity and revocation of `serial` (what a status query needs), without building the
    /// identifiers; or the ticket to read them from the store with.
    pub fn standing(&self, serial: &Serial) -> Lookup<(i64, i64, Option<Revocation>)> {
        self.look(serial, |entry| {
            (
                entry.not_before_s(),
                entry.not_after_s(),
                entry.revocation(),
            )
        })
    }

    /// Caches what the store answered to a lookup that missed, unless the certificate's
    /// shard was invalidated since the ticket was taken (the answer may predate a change).
    /// The store's "no such certificate" is not cached: it can be issued any moment.
    pub fn fill(&self, ticket: Ticket, summary: &CertificateSummary) {
        if self.shard_budget == 0 {
            return;
        }
        let Some(entry) = Entry::new(summary) else {
            tracing::error!(serial = %summary.serial, "certificate not cacheable");
            return;
        };
        let shard = &self.shards[shard_of(ticket.hash)];
        let mut table = shard.table.write().unpoisoned();
        if shard.epoch.load(Ordering::Acquire) != ticket.epoch {
            return;
        }
        let evicted = table.insert(ticket.hash, entry, self.shard_budget, &self.hasher);
        self.counters.evictions.inc_by(evicted);
    }

    /// Forgets `serials`: called once a change to them (revocation, release, renewal,
    /// deletion, or another process's change) is visible in the store, before it is
    /// acknowledged. Lookups in flight on their shards do not fill what they read.
    pub fn invalidate(&self, serials: &[Serial]) {
        for serial in serials {
            let (hash, shard) = self.locate(serial.as_bytes());
            let mut table = shard.table.write().unpoisoned();
            shard.epoch.fetch_add(1, Ordering::AcqRel);
            table.remove(hash, serial.as_bytes(), &self.hasher);
        }
    }

    /// Forgets everything (after changes may have been missed).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut table = shard.table.write().unpoisoned();
            shard.epoch.fetch_add(1, Ordering::AcqRel);
            *table = Table::default();
        }
    }

    /// How many certificates are cached, and their bytes as the budget counts them.
    pub fn usage(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(len, bytes), shard| {
            let table = shard.table.read().unpoisoned();
            (len + table.len(), bytes + table.bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(serial: &[u8], customer: &str, device: &str) -> CertificateSummary {
        let mut public_key = [0u8; 65];
        public_key[0] = 4;
        public_key[1..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8 ^ serial[serial.len() - 1]);
        CertificateSummary {
            serial: Serial::from_bytes("serial", serial).unwrap(),
            customer_id: CustomerId::parse("customer", customer).unwrap(),
            device_id: DeviceId::parse("device", device).unwrap(),
            not_before_s: -5,
            not_after_s: 1_900_000_000,
            public_key,
            revocation: None,
            attestation: AttestationClass::NONE,
            key_algorithm: KeyAlgorithm::P256,
        }
    }

    fn cache(budget: u64) -> CertificateCache {
        CertificateCache::new(budget, CacheCounters::detached())
    }

    /// Looks `summary` up and, on a miss, fills it as the store's answer.
    fn look_up_or_fill(cache: &CertificateCache, summary: &CertificateSummary) -> bool {
        match cache.get(&summary.serial) {
            Lookup::Hit(found) => {
                assert_eq!(found, CachedCertificate::of(summary));
                true
            }
            Lookup::Miss(ticket) => {
                cache.fill(ticket, summary);
                false
            }
        }
    }

    fn hit(cache: &CertificateCache, serial: &Serial) -> Option<CachedCertificate> {
        match cache.get(serial) {
            Lookup::Hit(found) => Some(found),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn a_filled_entry_gives_back_the_summary_for_every_serial_and_identifier_length() {
        let cache = cache(1 << 20);
        let longest_customer = "c".repeat(CustomerId::MAX_LEN);
        let longest_device = "d".repeat(DeviceId::MAX_LEN);
        let mut revoked = summary(&[0x40, 2, 3], "cust-1", "phone.1:x@y-z");
        for reason in RevocationReason::ALL {
            revoked.revocation = Some(Revocation {
                revoked_at_s: 1_700_000_123,
                reason,
            });
            let cache = self::cache(1 << 20);
            assert!(!look_up_or_fill(&cache, &revoked));
            assert!(look_up_or_fill(&cache, &revoked), "{reason:?}");
        }
        let summaries = [
            summary(&[1], "a", "b"),
            summary(&[0x7f; 20], &longest_customer, &longest_device),
            revoked,
        ];
        for s in &summaries {
            assert!(!look_up_or_fill(&cache, s), "the first lookup misses");
        }
        for s in &summaries {
            assert!(look_up_or_fill(&cache, s), "the second one hits");
            match cache.standing(&s.serial) {
                Lookup::Hit(standing) => {
                    assert_eq!(standing, (s.not_before_s, s.not_after_s, s.revocation))
                }
                Lookup::Miss(_) => panic!("standing missed"),
            }
        }
        assert_eq!(cache.usage().0, 3);
        assert_eq!(cache.counters.hits.get(), 3 + 3);
        assert_eq!(cache.counters.misses.get(), 3);
    }

    #[test]
    fn a_fill_read_before_an_invalidation_of_its_shard_is_not_kept() {
        let cache = cache(1 << 20);
        let s = summary(&[0x41; 16], "cust", "dev-1");
        let Lookup::Miss(ticket) = cache.get(&s.serial) else {
            panic!("an empty cache hit");
        };
        // The store's answer was read, then the certificate was revoked and invalidated.
        cache.invalidate(std::slice::from_ref(&s.serial));
        cache.fill(ticket, &s);
        assert_eq!(hit(&cache, &s.serial), None, "the stale answer was kept");

        let Lookup::Miss(ticket) = cache.get(&s.serial) else {
            panic!("hit after an invalidation");
        };
        cache.clear();
        cache.fill(ticket, &s);
        assert_eq!(
            hit(&cache, &s.serial),
            None,
            "clear turns away fills in flight"
        );

        let Lookup::Miss(ticket) = cache.get(&s.serial) else {
            panic!("hit after clear");
        };
        cache.fill(ticket, &s);
        assert_eq!(hit(&cache, &s.serial), Some(CachedCertificate::of(&s)));
        cache.invalidate(std::slice::from_ref(&s.serial));
        assert_eq!(hit(&cache, &s.serial), None, "invalidated entries are gone");
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn the_cache_stays_within_its_budget_and_keeps_what_is_looked_up_often() {
        let one = Table::cost(&Entry::new(&summary(&[0x40, 0, 0], "cust", "dev-0000")).unwrap());
        // Room for about 1,000 entries over the 64 shards.
        let budget = (1_000 * one) as u64;
        let cache = cache(budget);
        let all: Vec<_> = (0..20_000u16)
            .map(|i| {
                summary(
                    &[0x40, (i >> 8) as u8, i as u8],
                    "cust",
                    &format!("dev-{i:04}"),
                )
            })
            .collect();
        let hot: Vec<_> = all[..50].iter().step_by(7).collect();
        for s in &hot {
            look_up_or_fill(&cache, s);
        }
        // The hot set is looked up between cold fills, as a skewed load does: CLOCK keeps it
        // (FIFO, or a referenced bit never set, would evict it within a shard's few entries).
        let mut hot_misses = 0;
        for s in &all[50..] {
            look_up_or_fill(&cache, s);
            hot_misses += hot.iter().filter(|h| !look_up_or_fill(&cache, h)).count();
            let (_, bytes) = cache.usage();
            assert!(
                bytes as u64 <= budget,
                "{bytes} bytes over a budget of {budget}"
            );
        }
        assert_eq!(hot_misses, 0, "hot entries were evicted");
        let (entries, bytes) = cache.usage();
        assert!(entries > 800 && entries <= 1_000, "{entries} entries");
        assert!(bytes as u64 > budget * 8 / 10);
        let filled = hot.len() + all.len() - 50;
        assert_eq!(cache.counters.evictions.get(), (filled - entries) as u64);
        // Every entry still cached is what was filled for its serial.
        let found = all
            .iter()
            .filter_map(|s| hit(&cache, &s.serial).map(|found| (found, s)))
            .inspect(|(found, s)| assert_eq!(*found, CachedCertificate::of(s)))
            .count();
        assert_eq!(found, entries);
    }

    #[test]
    fn a_cache_of_no_bytes_keeps_nothing() {
        let cache = cache(0);
        let s = summary(&[7, 7], "cust", "dev");
        assert!(!look_up_or_fill(&cache, &s));
        assert!(!look_up_or_fill(&cache, &s));
        assert_eq!(cache.usage(), (0, 0));
    }
}
