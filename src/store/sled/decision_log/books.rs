//! The daily-limit ledger the decision log keeps in memory, and its checkpoint.

use super::*;

/// The daily-limit ledger and the releases made, kept in memory.
#[derive(Debug, Default)]
pub struct Books {
    /// day (`YYYY-MM-DD`) → bucket key (customer, day, tier) → fen used; by day, so that past
    /// days leave memory whole ([`Books::forget_days_before`]).
    pub(super) buckets: BTreeMap<Vec<u8>, HashMap<Vec<u8>, i64>>,
    pub(super) released: HashMap<u64, i64>,
    /// Buckets changed since the last checkpoint, by day as `buckets`.
    pub(super) dirty: BTreeMap<Vec<u8>, HashSet<Vec<u8>>>,
    pub(super) fresh_releases: Vec<(u64, i64)>,
}

/// Past days taken out of the [`Books`], to be freed outside the log's lock.
#[derive(Debug)]
pub struct ForgottenDays {
    pub(super) buckets: BTreeMap<Vec<u8>, HashMap<Vec<u8>, i64>>,
    pub(super) _dirty: BTreeMap<Vec<u8>, HashSet<Vec<u8>>>,
}

impl ForgottenDays {
    /// How many buckets went.
    pub fn bucket_count(&self) -> usize {
        self.buckets.values().map(HashMap::len).sum()
    }
}

/// The day in a ledger key: customer \0 day \0 tier (identifiers never contain a zero byte).
pub(super) fn day_of(key: &[u8]) -> &[u8] {
    key.split(|b| *b == 0).nth(1).unwrap_or_default()
}

impl Books {
    /// The amount used in a ledger bucket.
    pub fn used(&self, key: &[u8]) -> i64 {
        self.buckets
            .get(day_of(key))
            .and_then(|day| day.get(key))
            .copied()
            .unwrap_or(0)
    }

    /// Adds a reserved amount to a bucket. The caller has checked, under the log's lock that
    /// [`DecisionLog::append`] holds, that it fits every ceiling (`ra::limits`).
    pub fn add_reservation(&mut self, key: &[u8], amount_fen: i64) {
        self.add(key, amount_fen);
    }

    /// Whether any bucket of `day` is held.
    pub fn has_day(&self, day: &str) -> bool {
        self.buckets.contains_key(day.as_bytes())
    }

    /// The oldest day that has buckets in memory.
    pub fn oldest_day(&self) -> Option<String> {
        self.buckets
            .keys()
            .next()
            .map(|day| String::from_utf8_lossy(day).into_owned())
    }

    /// How many (customer, day, tier) buckets are held.
    pub fn bucket_count(&self) -> usize {
        self.buckets.values().map(HashMap::len).sum()
    }

    /// When the reservation of decision `seq` was released, if it was.
    pub fn released_at(&self, seq: u64) -> Option<i64> {
        self.released.get(&seq).copied()
    }

    /// Gives back `amount_fen` reserved by decision `seq`; returns the amount used after.
    pub fn release(&mut self, seq: u64, key: &[u8], amount_fen: i64, at_ms: i64) -> i64 {
        self.add(key, -amount_fen);
        self.released.insert(seq, at_ms);
        self.fresh_releases.push((seq, at_ms));
        self.used(key)
    }

    /// Takes the buckets of days before `min_day` (`YYYY-MM-DD`) out of the books, as a
    /// restart would not load them: the limits apply per day, and nothing reads a past day's
    /// bucket. Without this, a long-running server would keep one bucket per customer, tier
    /// and day for ever. The two newest days that have buckets always stay, so a clock that
    /// jumped days ahead and came back does not reset today's limits. Returns what was taken,
    /// for the caller to free outside the log's lock.
    pub fn forget_days_before(&mut self, min_day: &str) -> ForgottenDays {
        let mut cut = min_day.as_bytes();
        if let Some(second_newest) = self
            .buckets
            .keys()
            .rev()
            .nth(1)
            .or_else(|| self.buckets.keys().next_back())
        {
            cut = cut.min(second_newest.as_slice());
        }
        let cut = cut.to_vec();
        let kept = self.buckets.split_off(&cut);
        let gone = std::mem::replace(&mut self.buckets, kept);
        // Changes not yet checkpointed go too: no start loads these days.
        let kept = self.dirty.split_off(&cut);
        ForgottenDays {
            buckets: gone,
            _dirty: std::mem::replace(&mut self.dirty, kept),
        }
    }

    pub(super) fn set(&mut self, key: &[u8], used: i64) {
        // The day's map exists for all but a day's first bucket: no allocation for its key.
        let day = day_of(key);
        match self.buckets.get_mut(day) {
            Some(buckets) => match buckets.get_mut(key) {
                Some(slot) => *slot = used,
                None => {
                    buckets.insert(key.to_vec(), used);
                }
            },
            None => {
                self.buckets
                    .insert(day.to_vec(), HashMap::from([(key.to_vec(), used)]));
            }
        }
    }

    pub(super) fn add(&mut self, key: &[u8], delta: i64) {
        let used = self.used(key).saturating_add(delta).max(0);
        self.set(key, used);
        if !self
            .dirty
            .get(day_of(key))
            .is_some_and(|keys| keys.contains(key))
        {
            self.mark_dirty(key.to_vec());
        }
    }

    pub(super) fn mark_dirty(&mut self, key: Vec<u8>) {
        match self.dirty.get_mut(day_of(&key)) {
            Some(keys) => {
                keys.insert(key);
            }
            None => {
                self.dirty
                    .insert(day_of(&key).to_vec(), HashSet::from([key]));
            }
        }
    }

    /// The buckets changed since the last checkpoint, taken out of the books.
    pub(super) fn take_dirty(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.dirty)
            .into_values()
            .flatten()
            .collect()
    }

    /// Replays one record during recovery.
    pub(super) fn apply(&mut self, seq: u64, record: &LogRecord) -> Result<()> {
        match record {
            LogRecord::Decision { evidence, .. } => {
                if evidence.reserved_fen > 0 {
                    let customer = evidence.customer_id.as_ref().ok_or_else(|| {
                        Error::internal(format!("decision {seq} reserved without a customer"))
                    })?;
                    let key = crate::store::ledger_key(customer, &evidence.day, evidence.tier);
                    self.add(&key, evidence.reserved_fen);
                }
            }
            LogRecord::Release {
                decision_seq,
                ledger_key_hex,
                amount_fen,
                released_at_ms,
                ..
            } => {
                let key = hex::decode(ledger_key_hex)
                    .map_err(|_| Error::internal(format!("release {seq}: bad ledger key")))?;
                self.release(*decision_seq, &key, *amount_fen, *released_at_ms);
            }
        }
        Ok(())
    }
}

/// What a ledger checkpoint holds: the buckets and releases as of record `through_seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerCheckpoint {
    pub through_seq: u64,
    pub buckets: Vec<(Vec<u8>, i64)>,
    pub released: Vec<(u64, i64)>,
}
