//! The in-memory view of every certificate the verifier needs: key, identity, validity and
//! revocation. Loaded at start, updated after each durable change and before the change is
//! acknowledged, so the hot path reads no disk and a revocation is effective for the very
//! next verification.

use crate::sync::Unpoisoned;
use std::hash::BuildHasher;
use std::sync::RwLock;

use crate::attestation::AttestationClass;
use crate::error::Result;
use crate::model::{CustomerId, DeviceId, KeyAlgorithm, RevocationReason, Serial};
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
    /// What the enrollment's attestation proved (what the certificate counts for).
    pub attestation: AttestationClass,
    /// P-256 or SM2: how the device signs its payments.
    pub key_algorithm: KeyAlgorithm,
}

/// One certificate as the map keeps it: a single allocation of about 150 bytes holding
/// the serial, the key, validity, revocation and both identifiers, so that a million
/// certificates take about 200 MB with the table (one pointer per slot).
///
/// Layout: serial length (1) | serial (up to 20) | public key (65) | notBefore i64 LE |
/// notAfter i64 LE | revocation: reason code + 1, or 0 for none (1) | revoked_at_s i64 LE |
/// attestation class (1) | key algorithm (1) | customer length (1) | customer | device.
struct Entry(Box<[u8]>);

/// The longest serial RFC 5280 allows.
const MAX_SERIAL: usize = 20;
const KEY_LEN: usize = 65;

impl Entry {
    fn new(summary: &crate::store::CertificateSummary) -> Option<Entry> {
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

    fn public_key(&self) -> &[u8; KEY_LEN] {
        let at = self.fixed();
        // The layout puts exactly KEY_LEN bytes here.
        self.0[at..at + KEY_LEN].try_into().unwrap_or(&[0; KEY_LEN])
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

#[cfg(test)]
fn public_key(hex_text: &str) -> Option<[u8; 65]> {
    let mut key = [0u8; 65];
    hex::decode_to_slice(hex_text, &mut key).ok()?;
    Some(key)
}

/// The entries, found by their serial (SipHash with a random key: serials in requests come
/// from callers).
#[derive(Default)]
struct Table {
    entries: hashbrown::HashTable<Entry>,
}

impl Table {
    fn get(&self, hash: u64, serial: &[u8]) -> Option<&Entry> {
        self.entries.find(hash, |entry| entry.serial() == serial)
    }

    fn get_mut(&mut self, hash: u64, serial: &[u8]) -> Option<&mut Entry> {
        self.entries
            .find_mut(hash, |entry| entry.serial() == serial)
    }

    fn insert(&mut self, hash: u64, entry: Entry, hasher: &RandomState) {
        match self.entries.entry(
            hash,
            |e| e.serial() == entry.serial(),
            |e| hasher.hash_one(e.serial()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => *occupied.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(entry);
            }
        }
    }

    fn remove(&mut self, hash: u64, serial: &[u8]) {
        if let Ok(found) = self
            .entries
            .find_entry(hash, |entry| entry.serial() == serial)
        {
            found.remove();
        }
    }
}

type RandomState = std::collections::hash_map::RandomState;
use std::collections::HashMap;

/// How many tables the cache is split into, each behind its own lock. A scan for the
/// metrics holds one table's lock at a time: with a million certificates, one lock over
/// the whole table was held for about 50 ms per `/metrics` scrape, and every writer (an
/// enrollment, a revocation) and, behind the waiting writer, every verification waited.
const SHARDS: usize = 64;

/// The table that holds a serial of this hash. Bits 32–37: hashbrown takes a slot from the
/// low bits and a tag from the top seven, so these leave both spread within a table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// A serial as the key index holds it: length and up to 20 octets, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SerialSlot {
    len: u8,
    octets: [u8; MAX_SERIAL],
}

impl SerialSlot {
    fn of(serial: &[u8]) -> Option<SerialSlot> {
        let mut octets = [0u8; MAX_SERIAL];
        octets.get_mut(..serial.len())?.copy_from_slice(serial);
        Some(SerialSlot {
            len: serial.len() as u8,
            octets,
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.octets[..usize::from(self.len)]
    }
}

/// The certificates of one device key: almost always one (a renewal that keeps the key adds
/// one), so the common case needs no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyHolders {
    One(SerialSlot),
    Many(Vec<SerialSlot>),
}

impl KeyHolders {
    fn add(&mut self, slot: SerialSlot) {
        match self {
            KeyHolders::One(one) if *one == slot => {}
            KeyHolders::One(one) => *self = KeyHolders::Many(vec![*one, slot]),
            KeyHolders::Many(many) => {
                if !many.contains(&slot) {
                    many.push(slot);
                }
            }
        }
    }

    /// Removes `serial`; true when none is left.
    fn remove(&mut self, serial: &[u8]) -> bool {
        match self {
            KeyHolders::One(one) => one.bytes() == serial,
            KeyHolders::Many(many) => {
                many.retain(|slot| slot.bytes() != serial);
                many.is_empty()
            }
        }
    }

    fn slots(&self) -> &[SerialSlot] {
        match self {
            KeyHolders::One(one) => std::slice::from_ref(one),
            KeyHolders::Many(many) => many,
        }
    }
}

/// serial → certificate facts, shared by all request threads; and, for each device key, every
/// certificate of it.
pub struct CertificateCache {
    shards: Box<[RwLock<Table>]>,
    hasher: RandomState,
    /// Key fingerprint (keyed SipHash of the SEC1 point) → the serials certifying the key:
    /// about 40 bytes a certificate. A fingerprint collision (about 2^-64 a pair) only adds a
    /// candidate; [`CertificateCache::key_holders`] compares the whole key.
    keys: RwLock<HashMap<u64, KeyHolders>>,
    /// Fingerprints of keys a certificate was revoked for keyCompromise with: such a key is
    /// never certified again, however many certificates it had.
    compromised: RwLock<std::collections::HashSet<u64>>,
}

/// What the one-key-one-device check needs to know of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStanding {
    /// A certificate of the key was revoked for keyCompromise.
    pub compromised: bool,
    /// The newest live (valid or held, unexpired) certificate of the key, with its holder.
    pub live_holder: Option<(Serial, CustomerId, DeviceId)>,
}

impl Default for CertificateCache {
    fn default() -> Self {
        CertificateCache {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            keys: RwLock::default(),
            compromised: RwLock::default(),
        }
    }
}

impl CertificateCache {
    /// Reads every certificate's summary from `store`.
    pub fn load(store: &dyn Store) -> Result<CertificateCache> {
        let cache = CertificateCache::default();
        let mut tables: Vec<Table> = (0..SHARDS).map(|_| Table::default()).collect();
        let mut keys: HashMap<u64, KeyHolders> = HashMap::new();
        let mut compromised = std::collections::HashSet::new();
        store.for_each_certificate_summary(&mut |summary| {
            if summary.revocation.map(|r| r.reason) == Some(RevocationReason::KeyCompromise) {
                compromised.insert(cache.hasher.hash_one(summary.public_key));
            }
            if let Some(slot) = SerialSlot::of(summary.serial.as_bytes()) {
                let fingerprint = cache.hasher.hash_one(summary.public_key);
                match keys.get_mut(&fingerprint) {
                    Some(holders) => holders.add(slot),
                    None => {
                        keys.insert(fingerprint, KeyHolders::One(slot));
                    }
                }
            }
            if let Some(entry) = Entry::new(&summary) {
                let hash = cache.hasher.hash_one(entry.serial());
                tables[shard_of(hash)].insert(hash, entry, &cache.hasher);
            }
        })?;
        for (shard, mut table) in cache.shards.iter().zip(tables) {
            let hasher = &cache.hasher;
            table.entries.shrink_to_fit(|e| hasher.hash_one(e.serial()));
            *shard.write().unpoisoned() = table;
        }
        *cache.keys.write().unpoisoned() = keys;
        *cache.compromised.write().unpoisoned() = compromised;
        Ok(cache)
    }

    /// The hash of `serial` and the lock of the table that holds it.
    fn locate(&self, serial: &[u8]) -> (u64, &RwLock<Table>) {
        let hash = self.hasher.hash_one(serial);
        (hash, &self.shards[shard_of(hash)])
    }

    fn read(shard: &RwLock<Table>) -> std::sync::RwLockReadGuard<'_, Table> {
        shard.read().unpoisoned()
    }

    fn write(shard: &RwLock<Table>) -> std::sync::RwLockWriteGuard<'_, Table> {
        shard.write().unpoisoned()
    }

    /// The facts about `serial`, if payra issued it.
    pub fn get(&self, serial: &Serial) -> Option<CachedCertificate> {
        let (hash, shard) = self.locate(serial.as_bytes());
        Self::read(shard)
            .get(hash, serial.as_bytes())
            .map(Entry::view)
    }

    /// Validity and revocation of `serial` (what a status query needs), without building the
    /// identifiers.
    pub fn standing(&self, serial: &Serial) -> Option<(i64, i64, Option<Revocation>)> {
        let (hash, shard) = self.locate(serial.as_bytes());
        Self::read(shard).get(hash, serial.as_bytes()).map(|entry| {
            (
                entry.not_before_s(),
                entry.not_after_s(),
                entry.revocation(),
            )
        })
    }

    /// Adds or replaces a certificate from its stored summary.
    pub fn put_summary(&self, summary: &crate::store::CertificateSummary) {
        self.put_summary_with(summary, false);
    }

    /// Adds a certificate from its stored summary unless the cache has it: an entry put
    /// meanwhile (by a newer read) is kept.
    pub fn put_summary_if_absent(&self, summary: &crate::store::CertificateSummary) {
        self.put_summary_with(summary, true);
    }

    fn put_summary_with(&self, summary: &crate::store::CertificateSummary, if_absent: bool) {
        self.insert(Entry::new(summary), &summary.serial, if_absent);
    }

    /// Adds or replaces a certificate.
    pub fn put(&self, record: &CertificateRecord) {
        self.put_with(record, false);
    }

    /// Adds a just-issued certificate unless the cache has it already: with a store shared by
    /// several processes, another process's change to it (a revocation by device) may have
    /// arrived first, and is newer.
    pub fn put_if_absent(&self, record: &CertificateRecord) {
        self.put_with(record, true);
    }

    fn put_with(&self, record: &CertificateRecord, if_absent: bool) {
        let entry = crate::store::CertificateSummary::of(record)
            .ok()
            .and_then(|summary| Entry::new(&summary));
        self.insert(entry, &record.serial, if_absent);
    }

    fn insert(&self, entry: Option<Entry>, serial: &Serial, if_absent: bool) {
        match entry {
            Some(entry) => {
                if let Some(slot) = SerialSlot::of(entry.serial()) {
                    let fingerprint = self.hasher.hash_one(entry.public_key());
                    let mut keys = self.keys.write().unpoisoned();
                    match keys.get_mut(&fingerprint) {
                        Some(holders) => holders.add(slot),
                        None => {
                            keys.insert(fingerprint, KeyHolders::One(slot));
                        }
                    }
                }
                let (hash, shard) = self.locate(entry.serial());
                let mut table = Self::write(shard);
                if !(if_absent && table.get(hash, entry.serial()).is_some()) {
                    table.insert(hash, entry, &self.hasher);
                }
            }
            None => tracing::error!(serial = %serial, "certificate not cacheable"),
        }
    }

    /// Sets (or clears, with `None`) the revocation of known serials.
    pub fn set_revocation(&self, serials: &[Serial], revocation: Option<Revocation>) {
        let compromise = revocation.map(|r| r.reason) == Some(RevocationReason::KeyCompromise);
        for serial in serials {
            let (hash, shard) = self.locate(serial.as_bytes());
            if let Some(entry) = Self::write(shard).get_mut(hash, serial.as_bytes()) {
                entry.set_revocation(revocation);
                if compromise {
                    let fingerprint = self.hasher.hash_one(entry.public_key());
                    self.compromised.write().unpoisoned().insert(fingerprint);
                }
            }
        }
    }

    /// Where `public_key` stands for a new certificate: compromised or not, and its newest
    /// live holder. Looks at the key's certificates newest first and stops at the first live
    /// one (every live certificate of a key has one holder: Enroll and Renew see to it), so a
    /// key enrolled many times costs no more than one lookup while its newest is live.
    pub fn key_standing(&self, public_key: &[u8; 65], now_s: i64) -> KeyStanding {
        let fingerprint = self.hasher.hash_one(public_key);
        let compromised = self.compromised.read().unpoisoned().contains(&fingerprint);
        let slots: Vec<SerialSlot> = match self.keys.read().unpoisoned().get(&fingerprint) {
            Some(holders) => holders.slots().to_vec(),
            None => Vec::new(),
        };
        let mut live_holder = None;
        for slot in slots.iter().rev() {
            let (hash, shard) = self.locate(slot.bytes());
            let table = Self::read(shard);
            let Some(entry) = table.get(hash, slot.bytes()) else {
                continue;
            };
            let live = now_s < entry.not_after_s()
                && entry
                    .revocation()
                    .is_none_or(|r| r.reason == RevocationReason::CertificateHold);
            if live && entry.public_key() == public_key {
                let view = entry.view();
                if let Ok(serial) = Serial::from_bytes("serial", slot.bytes()) {
                    live_holder = Some((serial, view.customer, view.device));
                    break;
                }
            }
        }
        KeyStanding {
            compromised,
            live_holder,
        }
    }

    /// Forgets deleted certificates.
    pub fn remove(&self, serials: &[Serial]) {
        for serial in serials {
            let (hash, shard) = self.locate(serial.as_bytes());
            let key = Self::read(shard)
                .get(hash, serial.as_bytes())
                .map(|entry| *entry.public_key());
            if let Some(key) = key {
                let fingerprint = self.hasher.hash_one(key);
                let mut keys = self.keys.write().unpoisoned();
                if keys
                    .get_mut(&fingerprint)
                    .is_some_and(|holders| holders.remove(serial.as_bytes()))
                {
                    keys.remove(&fingerprint);
                }
            }
            Self::write(shard).remove(hash, serial.as_bytes());
        }
    }

    /// Every cached certificate of `public_key`, with its serial.
    pub fn key_holders(&self, public_key: &[u8; 65]) -> Vec<(Serial, CachedCertificate)> {
        let fingerprint = self.hasher.hash_one(public_key);
        let slots: Vec<SerialSlot> = match self.keys.read().unpoisoned().get(&fingerprint) {
            Some(holders) => holders.slots().to_vec(),
            None => return Vec::new(),
        };
        slots
            .iter()
            .filter_map(|slot| {
                let serial = Serial::from_bytes("serial", slot.bytes()).ok()?;
                let holder = self.get(&serial)?;
                (holder.public_key == *public_key).then_some((serial, holder))
            })
            .collect()
    }

    /// Certificates by status name at `now_s`.
    pub fn count_by_status(&self, now_s: i64) -> Vec<(&'static str, usize)> {
        use super::status::{CertificateStatus, StatusView};
        let mut counts = [0usize; 6];
        // One table at a time: the counts are each table's at the moment it is read.
        for shard in self.shards.iter() {
            let table = Self::read(shard);
            for cert in table.entries.iter() {
                let view = StatusView::at(
                    cert.not_before_s(),
                    cert.not_after_s(),
                    cert.revocation(),
                    now_s,
                );
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
        self.shards
            .iter()
            .map(|shard| Self::read(shard).entries.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeviceInfo;

    fn record(serial: &[u8], customer: &str, device: &str) -> CertificateRecord {
        let mut key = [0u8; 65];
        key[0] = 4;
        key[1..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        CertificateRecord {
            version: 1,
            serial: Serial::from_bytes("serial", serial).unwrap(),
            customer_id: CustomerId::parse("customer", customer).unwrap(),
            device_id: DeviceId::parse("device", device).unwrap(),
            device_info: DeviceInfo::default(),
            subject: String::new(),
            not_before_s: -5,
            not_after_s: 1_900_000_000,
            issued_at_s: 0,
            public_key_hex: hex::encode(key),
            key_algorithm: Default::default(),
            certificate_b64: String::new(),
            revocation: None,
            renewed_from: None,
            superseded_by: None,
            subscriber_ref: None,
            attestation: None,
            issued_upstream: false,
        }
    }

    fn expected(record: &CertificateRecord) -> CachedCertificate {
        CachedCertificate {
            public_key: public_key(&record.public_key_hex).unwrap(),
            customer: record.customer_id.clone(),
            device: record.device_id.clone(),
            not_before_s: record.not_before_s,
            not_after_s: record.not_after_s,
            revocation: record.revocation,
            attestation: AttestationClass::NONE,
            key_algorithm: record.key_algorithm,
        }
    }

    #[test]
    fn entries_give_back_what_was_put_for_every_serial_and_identifier_length() {
        let cache = CertificateCache::default();
        let longest_customer = "c".repeat(CustomerId::MAX_LEN);
        let longest_device = "d".repeat(DeviceId::MAX_LEN);
        let records = [
            record(&[1], "a", "b"),
            record(&[0x7f; 20], &longest_customer, &longest_device),
            record(&[0x40, 2, 3], "cust-1", "phone.1:x@y-z"),
        ];
        for r in &records {
            cache.put(r);
        }
        assert_eq!(cache.len(), 3);
        for r in &records {
            assert_eq!(cache.get(&r.serial), Some(expected(r)));
            assert_eq!(
                cache.standing(&r.serial),
                Some((r.not_before_s, r.not_after_s, None))
            );
        }
        let unknown = Serial::from_bytes("serial", &[9, 9]).unwrap();
        assert_eq!(cache.get(&unknown), None);
    }

    #[test]
    fn the_key_index_names_every_certificate_of_a_key() {
        let cache = CertificateCache::default();
        let first = record(&[1, 2, 3], "alice", "phone");
        let second = record(&[4, 5, 6], "alice", "phone");
        let key = public_key(&first.public_key_hex).unwrap();
        assert!(cache.key_holders(&key).is_empty());
        cache.put(&first);
        cache.put(&first);
        assert_eq!(cache.key_holders(&key).len(), 1, "a put again adds nothing");
        cache.put(&second);
        let serials: Vec<Serial> = cache.key_holders(&key).into_iter().map(|h| h.0).collect();
        assert_eq!(serials, vec![first.serial.clone(), second.serial.clone()]);
        let mut other_key = key;
        other_key[64] ^= 1;
        assert!(cache.key_holders(&other_key).is_empty());
        cache.remove(std::slice::from_ref(&second.serial));
        assert_eq!(
            cache.key_holders(&key)[0].0,
            first.serial,
            "the older one is still found"
        );
        cache.remove(std::slice::from_ref(&first.serial));
        assert!(cache.key_holders(&key).is_empty());
    }

    #[test]
    fn revocation_is_set_and_cleared_in_place_and_a_put_replaces() {
        let cache = CertificateCache::default();
        let first = record(&[0x41; 16], "cust", "dev-1");
        let second = record(&[0x42; 16], "cust", "dev-2");
        cache.put(&first);
        cache.put(&second);
        for reason in RevocationReason::ALL {
            let revocation = Revocation {
                revoked_at_s: 1_700_000_123,
                reason,
            };
            cache.set_revocation(std::slice::from_ref(&first.serial), Some(revocation));
            assert_eq!(
                cache.get(&first.serial).unwrap().revocation,
                Some(revocation)
            );
            assert_eq!(cache.get(&second.serial), Some(expected(&second)));
        }
        cache.set_revocation(std::slice::from_ref(&first.serial), None);
        assert_eq!(cache.get(&first.serial), Some(expected(&first)));

        let mut renewed = first.clone();
        renewed.not_after_s = 2_000_000_000;
        renewed.device_id = DeviceId::parse("device", "dev-1-new").unwrap();
        cache.put(&renewed);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&first.serial), Some(expected(&renewed)));
    }

    #[test]
    fn removed_serials_are_gone_and_counts_follow_status() {
        let cache = CertificateCache::default();
        let records: Vec<_> = (1..=50u8)
            .map(|i| record(&[0x40, i], "cust", &format!("dev-{i}")))
            .collect();
        for r in &records {
            cache.put(r);
        }
        let revoked = Revocation {
            revoked_at_s: 10,
            reason: RevocationReason::KeyCompromise,
        };
        cache.set_revocation(&[records[0].serial.clone()], Some(revoked));
        cache.remove(&[records[1].serial.clone(), records[2].serial.clone()]);
        assert_eq!(cache.len(), 48);
        assert_eq!(cache.get(&records[1].serial), None);
        assert_eq!(cache.get(&records[3].serial), Some(expected(&records[3])));
        let counts: std::collections::HashMap<_, _> =
            cache.count_by_status(100).into_iter().collect();
        assert_eq!(counts["valid"], 47);
        assert_eq!(counts["revoked"], 1);
    }

    #[test]
    fn thousands_of_certificates_spread_over_every_table_and_are_all_found() {
        let cache = CertificateCache::default();
        let records: Vec<_> = (0..4_000u16)
            .map(|i| {
                record(
                    &[0x40, (i >> 8) as u8, i as u8],
                    "cust",
                    &format!("dev-{i}"),
                )
            })
            .collect();
        for r in &records {
            cache.put(r);
        }
        assert_eq!(cache.len(), records.len());
        assert!(cache
            .shards
            .iter()
            .all(|shard| !CertificateCache::read(shard).entries.is_empty()));
        for r in &records {
            assert_eq!(cache.get(&r.serial), Some(expected(r)));
        }
        let (gone, kept) = records.split_at(1_000);
        cache.remove(&gone.iter().map(|r| r.serial.clone()).collect::<Vec<_>>());
        assert_eq!(cache.len(), kept.len());
        assert!(gone.iter().all(|r| cache.get(&r.serial).is_none()));
        let counts: std::collections::HashMap<_, _> =
            cache.count_by_status(100).into_iter().collect();
        assert_eq!(counts["valid"], kept.len());
    }
}
