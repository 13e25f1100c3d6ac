//! The sled database itself: opening it (and recovering the issuance journal), the write
//! turn and its syncs, the certificate summaries built for an older database, and the
//! consistent export a backup takes.

use super::*;

/// One tree's share of the database ([`SledStore::tree_sizes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub name: String,
    pub entries: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

impl SledStore {
    /// Up to `limit` certificates whose notAfter is before `before_s`, found by a walk of
    /// the summaries (about 130 bytes each, and they hold everything a purge removes).
    /// Takes no write turn: notAfter never changes, so what the walk finds stays expired.
    /// A certificate revoked for keyCompromise is kept: it is what refuses its key for ever.
    pub(in crate::store) fn expired_candidates(
        &self,
        before_s: i64,
        limit: usize,
    ) -> Result<Vec<CertificateSummary>> {
        let mut expired = Vec::new();
        if limit == 0 {
            return Ok(expired);
        }
        for entry in self.summaries.iter() {
            let (serial, value) = entry?;
            let summary = CertificateSummary::decode(&serial, &value)?;
            if summary.not_after_s < before_s && !summary.key_compromised() {
                expired.push(summary);
                if expired.len() == limit {
                    break;
                }
            }
        }
        Ok(expired)
    }

    /// Deletes `candidates` (from [`SledStore::expired_candidates`]) with their indexes and
    /// CRL entries in one audited transaction, skipping any already gone. Returns the
    /// serials deleted.
    pub(in crate::store) fn purge_candidates(
        &self,
        candidates: Vec<CertificateSummary>,
        audit: &AuditEvent,
    ) -> Result<Vec<Serial>> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let writing = self.writing();
        let outcome = (
            &self.certificates,
            &self.by_customer,
            &self.by_device,
            &self.revoked,
            &self.audit,
            &self.meta,
            &self.summaries,
            &self.upstream_revocations,
            &self.by_key,
        )
            .transaction(
                |(
                    certificates,
                    by_customer,
                    by_device,
                    revoked,
                    log,
                    meta,
                    summaries,
                    upstream,
                    by_key,
                )| {
                    let mut purged = Vec::with_capacity(candidates.len());
                    for record in &candidates {
                        // Gone since the walk (another run purged it first), or revoked for
                        // keyCompromise since (kept: it refuses its key for ever).
                        let Some(now) = summaries.get(record.serial.as_bytes())? else {
                            continue;
                        };
                        let now = CertificateSummary::decode(record.serial.as_bytes(), &now)
                            .map_err(abort)?;
                        if now.key_compromised() {
                            continue;
                        }
                        purged.push(record.serial.clone());
                        certificates.remove(record.serial.as_bytes())?;
                        summaries.remove(record.serial.as_bytes())?;
                        // Its upstream revocation entry goes with it (RA mode).
                        upstream.remove(record.serial.as_bytes())?;
                        by_customer
                            .remove(index_key(record.customer_id.as_str(), &record.serial))?;
                        by_device.remove(index_key(record.device_id.as_str(), &record.serial))?;
                        by_key.remove(key_index_key(&record.public_key, &record.serial))?;
                        revoked.remove(record.serial.as_bytes())?;
                    }
                    if purged.is_empty() {
                        return Ok(purged);
                    }
                    let mut event = audit.clone();
                    event.outcome = format!("{} certificate records", purged.len());
                    append_audit(log, meta, &event)?;
                    Ok(purged)
                },
            );
        let purged = finish(outcome)?;
        {
            drop(writing);
            self.sync_sled()
        }?;
        Ok(purged)
    }

    /// Opens (or creates, uncompressed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore> {
        Self::open_with(dir, false)
    }

    /// Opens the database in `dir`, or creates it with its pages compressed if
    /// `compress_if_new` (`store.sled_compression`). An existing database keeps what it was
    /// created with.
    pub fn open_with(dir: &Path, compress_if_new: bool) -> Result<SledStore> {
        std::fs::create_dir_all(dir)?;
        let config = sled_config(dir, compress_if_new)?;
        // sled's I/O threads can hold the database's file lock for a moment after the last
        // handle in this process is gone (a reopen in the same process, as a restore or a test
        // does), so a held lock is tried again for up to LOCK_WAIT. Another process holding it
        // (a running server) still gets the error, after that wait.
        let started = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if lock_held(&e) && started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(Error::internal(format!(
                        "opening database {}: {e}",
                        dir.display()
                    )))
                }
            }
        };
        let commit = GroupCommit::new(db.clone(), dir)?;
        let (journal, journaled) = IssuanceJournal::open(&dir.join(ISSUANCE_JOURNAL_FILE))?;
        let store = SledStore {
            certificates: db.open_tree("certificates")?,
            tokens: db.open_tree("tokens")?,
            by_customer: db.open_tree("by_customer")?,
            by_device: db.open_tree("by_device")?,
            by_key: db.open_tree("by_key")?,
            revoked: db.open_tree("revoked")?,
            meta: db.open_tree("meta")?,
            write_turn: std::sync::Mutex::new(()),
            issue_queue: std::sync::Mutex::new(IssueQueue::default()),
            ledger: db.open_tree("ledger")?,
            releases: db.open_tree("releases")?,
            summaries: db.open_tree("cert_summaries")?,
            agreed_limits: db.open_tree("agreed_limits")?,
            upstream_revocations: db.open_tree("upstream_revocations")?,
            audit: db.open_tree("audit")?,
            client_certificates: db.open_tree("client_certificates")?,
            db,
            commit,
            journal: std::sync::Mutex::new(journal),
            journal_syncs: std::sync::atomic::AtomicU64::new(0),
            #[cfg(test)]
            skip_apply: std::sync::atomic::AtomicBool::new(false),
            journal_reset_bytes: std::sync::atomic::AtomicU64::new(IssuanceJournal::RESET_BYTES),
            sled_changes: std::sync::atomic::AtomicU64::new(0),
            sled_changes_synced: std::sync::atomic::AtomicU64::new(0),
            dir: dir.to_path_buf(),
            decisions_opened: std::sync::atomic::AtomicBool::new(false),
        };
        store.recover_issuance(journaled)?;
        store.build_missing_summaries()?;
        store.build_missing_key_index()?;
        Ok(store)
    }

    /// Empties the key index and its completion mark, as a database from before it existed
    /// would be (tests); with `partial`, leaves one entry in it, as a build a crash
    /// interrupted might.
    #[cfg(test)]
    pub fn danger_clear_key_index(&self, partial: Option<&[u8]>) -> Result<()> {
        self.by_key.clear()?;
        if let Some(entry) = partial {
            self.by_key.insert(entry, &[] as &[u8])?;
        }
        self.meta.remove(KEY_INDEX_COMPLETE_KEY)?;
        self.sync_sled()
    }

    /// Rewrites a certificate's record as JSON, the form stores before the compact one wrote
    /// (tests).
    #[cfg(test)]
    pub fn danger_store_as_json(&self, serial: &Serial) -> Result<()> {
        let stored = self.certificates.get(serial.as_bytes())?;
        let record = decode_certificate(&stored.expect("the certificate is stored"))?;
        self.certificates
            .insert(serial.as_bytes(), encode(&record)?)?;
        self.sync_sled()
    }

    /// The first octet of a certificate's stored record: `{` for JSON (tests).
    #[cfg(test)]
    pub fn danger_stored_form(&self, serial: &Serial) -> Result<u8> {
        let stored = self.certificates.get(serial.as_bytes())?;
        Ok(stored.expect("the certificate is stored")[0])
    }

    /// Empties the summaries tree, as a database from before it existed would be (tests).
    #[cfg(test)]
    pub fn danger_clear_summaries(&self) -> Result<()> {
        self.summaries.clear()?;
        self.sync_sled()
    }

    /// A database written before the `cert_summaries` tree existed gets it built once, from
    /// the full records. A build is marked in `meta` while it runs, so one a crash
    /// interrupted (some of its entries may be on disk) is done again from empty.
    pub(super) fn build_missing_summaries(&self) -> Result<()> {
        let interrupted = self.meta.get(SUMMARIES_BUILDING_KEY)?.is_some();
        if !interrupted && (!self.summaries.is_empty() || self.certificates.is_empty()) {
            return Ok(());
        }
        self.meta.insert(SUMMARIES_BUILDING_KEY, &[1u8] as &[u8])?;
        self.sync_sled()?;
        self.summaries.clear()?;
        let count = self.build_from(&self.summaries, &self.certificates, |serial, value| {
            let record = decode_certificate(value)?;
            Ok((serial.to_vec(), CertificateSummary::of(&record)?.encode()))
        })?;
        self.meta.remove(SUMMARIES_BUILDING_KEY)?;
        self.sync_sled()?;
        tracing::info!(certificates = count, "built the certificate summaries");
        Ok(())
    }

    /// Leaves the summaries as a crash in the middle of their build would: `kept`'s alone,
    /// and the build marked as under way (tests).
    #[cfg(test)]
    pub fn danger_interrupt_summaries_build(&self, kept: &Serial) -> Result<()> {
        for key in self.summaries.iter().keys() {
            let key = key?;
            if key.as_ref() != kept.as_bytes() {
                self.summaries.remove(key)?;
            }
        }
        self.meta.insert(SUMMARIES_BUILDING_KEY, &[1u8] as &[u8])?;
        self.sync_sled()
    }

    /// The key index is complete once `meta` says so: a database from before the `by_key`
    /// tree, or a build a crash interrupted (some of its batches may be on disk), gets it
    /// built again from the summaries, from empty, and marked complete after a sync.
    pub(super) fn build_missing_key_index(&self) -> Result<()> {
        if self.meta.get(KEY_INDEX_COMPLETE_KEY)?.is_some() {
            return Ok(());
        }
        self.by_key.clear()?;
        let count = self.build_from(&self.by_key, &self.summaries, |serial, value| {
            let summary = CertificateSummary::decode(serial, value)?;
            Ok((
                key_index_key(&summary.public_key, &summary.serial),
                Vec::new(),
            ))
        })?;
        self.meta.insert(KEY_INDEX_COMPLETE_KEY, &[1u8] as &[u8])?;
        self.sync_sled()?;
        if count > 0 {
            tracing::info!(certificates = count, "built the device key index");
        }
        Ok(())
    }

    /// Puts what `entry` makes of each entry of `source` into `tree`, then syncs; how many.
    fn build_from(
        &self,
        tree: &Tree,
        source: &Tree,
        entry: impl Fn(&[u8], &[u8]) -> Result<(Vec<u8>, Vec<u8>)>,
    ) -> Result<u64> {
        // Plain inserts: sled 0.34 holds on to what a large batch of inserts at random places
        // touches (a million random keys in batches of 10,000 grew the process by about 5 GB,
        // the same keys inserted one by one by 0.2 GB), and nothing here needs atomicity: the
        // callers mark a build in `meta` and redo one a crash interrupted.
        let mut count = 0u64;
        for item in source.iter() {
            let (key, value) = item?;
            let (key, value) = entry(&key, &value)?;
            tree.insert(key, value)?;
            count += 1;
        }
        self.sync_sled()?;
        Ok(count)
    }

    /// Deletes up to `limit` entries of `tree` after the key `after` that `old` picks (key,
    /// value), in one transaction with an audit entry whose outcome `outcome` words from the
    /// count, then syncs. The scan runs without the write turn (the entries it picks stay
    /// picked: they only age); the deletion takes it. Returns how many went, and the key to
    /// go on after, or `None` once the scan reached the end of the tree.
    pub(super) fn purge_where(
        &self,
        tree: &sled::Tree,
        after: Option<&[u8]>,
        limit: usize,
        audit: &AuditEvent,
        old: impl Fn(&[u8], &[u8]) -> Result<bool>,
        outcome: impl Fn(usize) -> String,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let entries = match after {
            Some(after) => tree
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => tree.iter(),
        };
        let mut keys = Vec::new();
        let mut next = None;
        for entry in entries {
            let (key, value) = entry?;
            if old(&key, &value)? {
                keys.push(key);
                if keys.len() == limit {
                    next = keys.last().map(|key| key.to_vec());
                    break;
                }
            }
        }
        if keys.is_empty() {
            return Ok((0, next));
        }
        let writing = self.writing();
        let result = (tree, &self.audit, &self.meta).transaction(|(tree, log, meta)| {
            for key in &keys {
                tree.remove(key)?;
            }
            let mut event = audit.clone();
            event.outcome = outcome(keys.len());
            append_audit(log, meta, &event)?;
            Ok(())
        });
        finish(result)?;
        drop(writing);
        self.sync_sled()?;
        Ok((keys.len(), next))
    }

    /// The trees a revocation or a release from hold changes, in the order their
    /// transactions name them: certificates, revoked, audit, meta, summaries.
    pub(super) fn revocation_trees(&self) -> (&Tree, &Tree, &Tree, &Tree, &Tree) {
        (
            &self.certificates,
            &self.revoked,
            &self.audit,
            &self.meta,
            &self.summaries,
        )
    }

    /// Whether no writer holds the write turn now (tests of what runs under it).
    #[cfg(test)]
    pub(in crate::store) fn write_turn_is_free(&self) -> bool {
        self.write_turn.try_lock().is_ok()
    }

    /// Counts a change to sled made under the write turn (see [`WriteTurn`]).
    pub(super) fn sled_changed(&self) {
        self.sled_changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes sled's writes durable (the group commit), and notes that every audited change
    /// counted before the sync began is covered.
    pub(super) fn sync_sled(&self) -> Result<()> {
        let changes = self.sled_changes.load(std::sync::atomic::Ordering::Acquire);
        self.commit.sync()?;
        self.sled_changes_synced
            .fetch_max(changes, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Ends a write transaction taken under `writing`: a change that was made (`Ok(Ok)`) is
    /// synced after the turn is released; a rejection wrote nothing and needs no sync.
    pub(super) fn synced_if_changed<T, R>(
        &self,
        writing: WriteTurn<'_>,
        outcome: std::result::Result<std::result::Result<T, R>, TransactionError<Error>>,
    ) -> Result<std::result::Result<T, R>> {
        let outcome = finish(outcome)?;
        if outcome.is_ok() {
            drop(writing);
            self.sync_sled()?;
        }
        Ok(outcome)
    }

    /// The write turn of a writer that changes sled directly. Releasing it counts a change,
    /// which a later sled sync must cover before an issuance batch chains after it.
    pub(super) fn writing(&self) -> WriteTurn<'_> {
        WriteTurn {
            store: self,
            _turn: self.journal_turn(),
        }
    }

    /// Writes a consistent snapshot of every tree to `out` (see [`backup`]): writers
    /// pause while it is taken.
    pub(super) fn export_trees(
        &self,
        out: &mut dyn std::io::Write,
        created_at_ms: i64,
        decision_log: &mut FrameSource<'_>,
    ) -> Result<backup::BackupSummary> {
        let mut exclusive = Some(self.writing());
        self.sync_sled()?;
        let trees: Vec<(String, Tree)> = self
            .db
            .tree_names()
            .into_iter()
            .filter_map(|name| {
                let name = String::from_utf8(name.to_vec()).ok()?;
                let tree = self.db.open_tree(&name).ok()?;
                Some((name, tree))
            })
            .collect();
        // Writers wait only while the trees are copied; the decision log's durable frames are
        // copied after (they never change once written).
        backup::write_backup(
            out,
            created_at_ms,
            &trees,
            &mut || drop(exclusive.take()),
            decision_log,
        )
    }

    /// Inserts certificate records with their indexes, with no audit entry and one sync at
    /// the end. For building benchmark data sets only (`payra bench
    /// populate`): records written this way are not in the audit chain.
    pub fn danger_bulk_insert_certificates(
        &self,
        records: impl Iterator<Item = CertificateRecord>,
    ) -> Result<u64> {
        let _writing = self.writing();
        // Plain inserts, not batches (see `build_from`): memory stays bounded.
        let mut count = 0u64;
        for record in records {
            let serial = record.serial.as_bytes();
            self.certificates
                .insert(serial, encode_certificate(&record)?)?;
            let summary = CertificateSummary::of(&record)?;
            self.by_key.insert(
                key_index_key(&summary.public_key, &record.serial),
                &[] as &[u8],
            )?;
            self.summaries.insert(serial, summary.encode())?;
            self.by_customer.insert(
                index_key(record.customer_id.as_str(), &record.serial),
                &[] as &[u8],
            )?;
            self.by_device.insert(
                index_key(record.device_id.as_str(), &record.serial),
                &[] as &[u8],
            )?;
            count += 1;
        }
        self.sync_sled()?;
        Ok(count)
    }

    /// Every tree's entries and the bytes of their keys and values (a pass over the whole
    /// database), and the database's size on disk: where the bytes go.
    pub fn tree_sizes(&self) -> Result<(Vec<TreeSize>, u64)> {
        let mut sizes = Vec::new();
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name)?;
            let mut size = TreeSize {
                name: String::from_utf8_lossy(&name).into_owned(),
                ..TreeSize::default()
            };
            for entry in tree.iter() {
                let (key, value) = entry?;
                size.entries += 1;
                size.key_bytes += key.len() as u64;
                size.value_bytes += value.len() as u64;
            }
            sizes.push(size);
        }
        Ok((sizes, self.db.size_on_disk()?))
    }

    /// The durability barrier, for metrics and tests of batching.
    pub fn group_commit(&self) -> &GroupCommit {
        &self.commit
    }

    /// Durable syncs of the database so far: the group commit's and the issuance journal's.
    pub fn syncs(&self) -> u64 {
        self.commit.syncs()
            + self
                .journal_syncs
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes and syncs everything; for shutdown.
    pub fn close(&self) -> Result<()> {
        self.sync_sled()?;
        let _ = &self.db;
        Ok(())
    }

    pub(super) fn serials_under(tree: &Tree, id: &str) -> Result<Vec<Serial>> {
        let prefix = index_prefix(id);
        tree.scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key?;
                Serial::from_bytes("serial", &key[prefix.len()..])
                    .map_err(|e| Error::internal(format!("corrupt index key: {e}")))
            })
            .collect()
    }
}
