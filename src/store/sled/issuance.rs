//! Enrollments and new tokens on sled: flat-combined batches, each one journal record and one
//! fdatasync (see `issuance_journal`), then plain inserts; and the replay of journaled
//! batches the database lacks when it opens.

use super::*;
use crate::sync::Unpoisoned;

/// The issuance journal's file name in the data directory.
pub const ISSUANCE_JOURNAL_FILE: &str = "issuance.journal";

/// One enrollment (or new token) waiting to be committed by
/// [`SledStore::commit_issue_batch`].
pub(in crate::store) struct IssueJob {
    work: JobWork,
    audit: AuditEvent,
    /// Set once, under the write turn, by whoever committed the batch.
    outcome: std::sync::OnceLock<std::result::Result<IssueOutcome, String>>,
    /// An async caller's receiver end, told the outcome when it is set.
    notify: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Result<IssueOutcome>>>>,
    /// An async caller's [`crate::store::OnIssued`], run under the write turn if the job issued.
    pub(super) on_issued: std::sync::Mutex<Option<crate::store::OnIssued>>,
}

/// The most jobs one batch takes from the queue: a backlog (after a slow sync, say) is
/// committed in several journal records rather than one past the record size limit.
const MAX_BATCH_JOBS: usize = 1024;

/// Takes up to [`MAX_BATCH_JOBS`] jobs from the front of the queue.
fn take_batch(jobs: &mut Vec<std::sync::Arc<IssueJob>>) -> Vec<std::sync::Arc<IssueJob>> {
    if jobs.len() <= MAX_BATCH_JOBS {
        std::mem::take(jobs)
    } else {
        jobs.drain(..MAX_BATCH_JOBS).collect()
    }
}

/// What a job writes, encoded before the write turn.
pub(super) enum JobWork {
    /// The token is consumed and the certificate stored with its summary and indexes.
    Enroll {
        hash: TokenHash,
        now_s: i64,
        serial: Serial,
        cert_value: Vec<u8>,
        summary: Vec<u8>,
        customer_key: Vec<u8>,
        device_key: Vec<u8>,
        /// The certificate's entry in the key index.
        key_key: Vec<u8>,
    },
    /// A new enrollment token is stored under its hash.
    Token { hash: TokenHash, value: Vec<u8> },
}

/// Enrollments and new tokens waiting to be committed.
#[derive(Default)]
pub(super) struct IssueQueue {
    jobs: Vec<std::sync::Arc<IssueJob>>,
    /// A blocking task is committing queued async enrollments; it runs until the queue is
    /// empty, so a new async enrollment starts one only when this is false.
    draining: bool,
}

impl IssueJob {
    /// Encodes everything the batch writes, so the write turn is spent on deciding, the
    /// journal and the inserts alone.
    pub(in crate::store) fn new(
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
        audit: &AuditEvent,
    ) -> Result<IssueJob> {
        let summary = CertificateSummary::of(certificate)?;
        Ok(IssueJob::with(
            JobWork::Enroll {
                hash: *hash,
                now_s,
                serial: certificate.serial.clone(),
                cert_value: encode_certificate(certificate)?,
                summary: summary.encode(),
                customer_key: index_key(certificate.customer_id.as_str(), &certificate.serial),
                device_key: index_key(certificate.device_id.as_str(), &certificate.serial),
                key_key: key_index_key(&summary.public_key, &certificate.serial),
            },
            audit,
        ))
    }

    /// A new token to store under `hash`.
    pub(in crate::store) fn token(
        hash: &TokenHash,
        token: &TokenRecord,
        audit: &AuditEvent,
    ) -> Result<IssueJob> {
        Ok(IssueJob::with(
            JobWork::Token {
                hash: *hash,
                value: encode(token)?,
            },
            audit,
        ))
    }

    pub(super) fn with(work: JobWork, audit: &AuditEvent) -> IssueJob {
        IssueJob {
            work,
            audit: audit.clone(),
            outcome: std::sync::OnceLock::new(),
            notify: std::sync::Mutex::new(None),
            on_issued: std::sync::Mutex::new(None),
        }
    }

    /// Sets the outcome, runs the caller's [`crate::store::OnIssued`] if the job issued, and tells
    /// an async caller. Called under the write turn, so the hook runs before any later write
    /// (a revocation of the new certificate) can commit.
    pub(super) fn finish(&self, outcome: std::result::Result<IssueOutcome, String>) {
        let issued = matches!(outcome, Ok(IssueOutcome::Issued));
        let _ = self.outcome.set(outcome);
        let on_issued = self.on_issued.lock().unpoisoned().take();
        if let (true, Some(on_issued)) = (issued, on_issued) {
            // The job is durable and stored whatever the hook does: a panic in it must not
            // stop the journal (and every later enrollment) or leave this batch unanswered.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(on_issued)).is_err() {
                tracing::error!(
                    "an enrollment's commit hook panicked; the certificate is stored, but its metric and log line are missing"
                );
            }
        }
        let notify = self.notify.lock().unpoisoned().take();
        if let Some(sender) = notify {
            // A caller that stopped waiting dropped its receiver; the outcome stands.
            let _ = sender.send(self.outcome().and_then(|o| {
                o.ok_or_else(|| Error::internal("issuance batch ended without an answer"))
            }));
        }
    }

    /// `None` until a batch committed (or failed) this job.
    pub(in crate::store) fn outcome(&self) -> Result<Option<IssueOutcome>> {
        match self.outcome.get() {
            None => Ok(None),
            Some(Ok(outcome)) => Ok(Some(outcome.clone())),
            Some(Err(message)) => Err(Error::internal(message.clone())),
        }
    }
}

impl SledStore {
    /// Applies the journaled enrollment batches the trees lack, has sled sync them, and
    /// empties the journal.
    pub(super) fn recover_issuance(&self, journaled: Vec<JournalRecord>) -> Result<()> {
        let applied = self.issuance_applied()?;
        if let Some((first, _)) = journaled.iter().find(|(seq, _)| *seq > applied) {
            if *first != applied + 1 {
                return Err(Error::internal(format!(
                    "the issuance journal starts at batch {first} but the database holds \
                     batches up to {applied} only: batches are missing; restore the data \
                     directory from a backup"
                )));
            }
        }
        let mut redone = 0usize;
        for (seq, puts) in journaled.iter().filter(|(seq, _)| *seq > applied) {
            self.apply_issuance(*seq, puts)?;
            redone += 1;
        }
        if journaled.is_empty() {
            return Ok(());
        }
        self.sync_sled()?;
        self.lock_journal().reset()?;
        if redone > 0 {
            tracing::warn!(
                batches = redone,
                "applied enrollments from the issuance journal that the database had not kept"
            );
        }
        Ok(())
    }

    /// The last journal batch whose writes are in the trees (0: none yet).
    pub(super) fn issuance_applied(&self) -> Result<u64> {
        Ok(match self.meta.get(ISSUANCE_APPLIED_KEY)? {
            Some(bytes) if bytes.len() == 8 => {
                u64::from_be_bytes(bytes.as_ref().try_into().unwrap_or([0; 8]))
            }
            _ => 0,
        })
    }

    pub(super) fn lock_journal(&self) -> std::sync::MutexGuard<'_, IssuanceJournal> {
        self.journal.lock().unpoisoned()
    }

    pub(super) fn journal_tree(&self, tree: JournalTree) -> &Tree {
        match tree {
            JournalTree::Tokens => &self.tokens,
            JournalTree::Certificates => &self.certificates,
            JournalTree::Summaries => &self.summaries,
            JournalTree::ByCustomer => &self.by_customer,
            JournalTree::ByDevice => &self.by_device,
            JournalTree::ByKey => &self.by_key,
            JournalTree::Audit => &self.audit,
            JournalTree::Meta => &self.meta,
        }
    }

    /// Puts a batch's writes into the trees as plain inserts, then its number. sled keeps its
    /// log's order, so a database that holds the number holds every write before it.
    pub(super) fn apply_issuance(&self, seq: u64, puts: &[Put]) -> Result<()> {
        for put in puts {
            self.journal_tree(put.tree)
                .insert(put.key.as_slice(), put.value.as_slice())?;
        }
        self.meta.insert(ISSUANCE_APPLIED_KEY, &seq.to_be_bytes())?;
        Ok(())
    }

    /// Queues `job` and waits for its outcome on this thread: whoever gets the write turn
    /// first commits everything queued, this job included.
    pub(super) fn commit_blocking(&self, job: IssueJob) -> Result<IssueOutcome> {
        let job = std::sync::Arc::new(job);
        self.issue_queue.lock().unpoisoned().jobs.push(job.clone());
        {
            let _writing = self.journal_turn();
            // Until somebody has committed this job: commit what is queued, ours included,
            // from the front (jobs leave the queue only under the turn, so a job that is
            // no longer queued has its outcome).
            while job.outcome.get().is_none() {
                let batch = take_batch(&mut self.issue_queue.lock().unpoisoned().jobs);
                if batch.is_empty() {
                    break;
                }
                self.commit_issue_batch(&batch);
            }
        }
        // The batch's journal record was synced before the turn was released.
        job.outcome()?
            .ok_or_else(|| Error::internal("issuance batch ended without an answer"))
    }

    /// Queues `job` for the committer (starting one on the blocking pool when none runs)
    /// and returns where its outcome will arrive; no thread waits for it.
    pub(super) fn queue_async(
        self: std::sync::Arc<Self>,
        job: IssueJob,
    ) -> crate::store::IssueReceiver {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        *job.notify.lock().unpoisoned() = Some(sender);
        let start = {
            let mut queue = self.issue_queue.lock().unpoisoned();
            queue.jobs.push(std::sync::Arc::new(job));
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::task::spawn_blocking(move || self.drain_issue_queue());
        }
        receiver
    }

    /// Commits queued enrollments, batch after batch, until the queue is empty.
    pub(super) fn drain_issue_queue(&self) {
        /// If committing panics, the next async enrollment must start a new drainer; the
        /// jobs of the lost batch are answered `INTERNAL` as their senders drop.
        struct Draining<'a>(&'a std::sync::Mutex<IssueQueue>);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.lock().unpoisoned().draining = false;
                }
            }
        }
        let _draining = Draining(&self.issue_queue);
        loop {
            // Jobs leave the queue only under the write turn: a blocking caller holding the
            // turn whose job has no outcome can then count on finding it still queued.
            let _writing = self.journal_turn();
            let batch = {
                let mut queue = self.issue_queue.lock().unpoisoned();
                if queue.jobs.is_empty() {
                    queue.draining = false;
                    return;
                }
                take_batch(&mut queue.jobs)
            };
            self.commit_issue_batch(&batch);
        }
    }

    /// Commits queued enrollments as one journal record, in queue order, and answers each
    /// job. The caller holds the write turn. Later jobs see the writes of earlier ones, so two
    /// jobs with one token get one certificate between them. When this returns, every issued
    /// job is on stable storage (the journal's `fdatasync`) and in the trees.
    pub(in crate::store) fn commit_issue_batch(&self, batch: &[std::sync::Arc<IssueJob>]) {
        /// A panic may come between the journal's append and the inserts: then no later
        /// batch may be decided on trees that lack this one.
        struct StopOnPanic<'a>(&'a SledStore);
        impl Drop for StopOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .lock_journal()
                        .fail("a panic while committing an enrollment batch".into());
                }
            }
        }
        let _stop_on_panic = StopOnPanic(self);
        match self.issue_batch(batch) {
            Ok(outcomes) => {
                for (job, outcome) in batch.iter().zip(outcomes) {
                    job.finish(outcome);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for job in batch {
                    job.finish(Err(message.clone()));
                }
            }
        }
    }

    /// Whether a certificate of `public_key` was revoked for keyCompromise. An enrollment
    /// batch asks under the write turn, which every revocation takes too: a key reported
    /// compromised before the batch is refused, and a certificate the batch stores is one a
    /// later revocation's second look finds (`Ra::revoke_batch`).
    ///
    /// It runs in the write turn, so it reads only the key and the revocation octets of each
    /// of the key's summaries, decoding nothing else, and stops at the first compromised one:
    /// damage elsewhere in a summary is found by the readers that decode it, not here.
    fn key_compromised(&self, public_key: &[u8; 65]) -> Result<bool> {
        let prefix = super::key_index_prefix(public_key);
        for entry in self.by_key.scan_prefix(prefix) {
            let (key, _) = entry?;
            // An entry whose summary is gone (purged between the two reads) is skipped.
            let Some(bytes) = self.summaries.get(&key[prefix.len()..])? else {
                continue;
            };
            // Checks the summary's version; the index holds the x coordinate and y's parity,
            // the summary (octets 1 to 65) the whole key.
            let reason = CertificateSummary::revocation_in(&bytes)?.map(|r| r.reason);
            if reason == Some(RevocationReason::KeyCompromise)
                && bytes.get(1..66) == Some(&public_key[..])
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Decides every job of `batch` in order, journals and applies the writes of those that
    /// succeed, and returns each job's outcome (a job-level error as its message).
    pub(super) fn issue_batch(
        &self,
        batch: &[std::sync::Arc<IssueJob>],
    ) -> Result<Vec<std::result::Result<IssueOutcome, String>>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut puts = Vec::with_capacity(batch.len() * 7 + 1);
        // What earlier jobs of this batch wrote, which the trees do not show yet.
        let mut used = std::collections::HashMap::new();
        let mut minted = std::collections::HashSet::new();
        let mut serials = std::collections::HashSet::new();
        // A batch is chained after the audit head that sled holds now. If a sled transaction
        // wrote that head and its writer has not synced yet, a crash could lose the entry
        // while the journal keeps this batch, and the replayed batch would link to an entry
        // that no longer exists. So such a transaction is made durable first (it is under
        // the turn now, so nothing else can write meanwhile).
        if self.sled_changes.load(std::sync::atomic::Ordering::Acquire)
            > self
                .sled_changes_synced
                .load(std::sync::atomic::Ordering::Acquire)
        {
            self.sync_sled()?;
        }
        let mut head = audit_head(self.meta.get(AUDIT_HEAD_KEY)?.as_deref());
        let mut put = |tree, key: &[u8], value: Vec<u8>| {
            puts.push(Put {
                tree,
                key: key.to_vec(),
                value,
            })
        };
        for job in batch {
            let (hash, now_s, serial, cert_value, summary, customer_key, device_key, key_key) =
                match &job.work {
                    JobWork::Token { hash, value } => {
                        if minted.contains(&hash.0)
                            || used.contains_key(&hash.0)
                            || self.tokens.contains_key(hash.0)?
                        {
                            outcomes.push(Err("token hash collision".to_string()));
                            continue;
                        }
                        let (audit_key, entry, next_head) = audit_entry(&head, &job.audit)?;
                        put(JournalTree::Tokens, &hash.0, value.clone());
                        put(JournalTree::Audit, &audit_key, entry);
                        head = next_head;
                        minted.insert(hash.0);
                        outcomes.push(Ok(IssueOutcome::Issued));
                        continue;
                    }
                    JobWork::Enroll {
                        hash,
                        now_s,
                        serial,
                        cert_value,
                        summary,
                        customer_key,
                        device_key,
                        key_key,
                    } => (
                        hash,
                        *now_s,
                        serial,
                        cert_value,
                        summary,
                        customer_key,
                        device_key,
                        key_key,
                    ),
                };
            let serial_key = serial.as_bytes();
            let mut token = if let Some(&used_at_s) = used.get(&hash.0) {
                outcomes.push(Ok(IssueOutcome::TokenRejected(
                    TokenRejection::AlreadyUsed { used_at_s },
                )));
                continue;
            } else {
                // A token minted in this batch is not in the trees yet; it cannot have been
                // handed out before its batch committed, so it counts as unknown here.
                match token_usable(self.tokens.get(hash.0)?.as_deref(), now_s)? {
                    Ok(token) => token,
                    Err(rejection) => {
                        outcomes.push(Ok(IssueOutcome::TokenRejected(rejection)));
                        continue;
                    }
                }
            };
            if serials.contains(serial_key) || self.certificates.contains_key(serial_key)? {
                outcomes.push(Ok(IssueOutcome::SerialTaken));
                continue;
            }
            // The enrollment's key claim read the key's certificates before this turn; a
            // keyCompromise revocation may have committed since (revocations take no claim).
            let key = CertificateSummary::decode(serial_key, summary)?.public_key;
            if self.key_compromised(&key)? {
                outcomes.push(Ok(IssueOutcome::KeyCompromised));
                continue;
            }
            token.used_at_s = Some(now_s);
            token.used_for_serial = Some(serial.clone());
            let (audit_key, entry, next_head) = audit_entry(&head, &job.audit)?;
            put(JournalTree::Tokens, &hash.0, encode(&token)?);
            put(JournalTree::Certificates, serial_key, cert_value.clone());
            put(JournalTree::Summaries, serial_key, summary.clone());
            put(JournalTree::ByCustomer, customer_key, Vec::new());
            put(JournalTree::ByDevice, device_key, Vec::new());
            put(JournalTree::ByKey, key_key, Vec::new());
            put(JournalTree::Audit, &audit_key, entry);
            head = next_head;
            used.insert(hash.0, now_s);
            serials.insert(serial_key);
            outcomes.push(Ok(IssueOutcome::Issued));
        }
        if puts.is_empty() {
            return Ok(outcomes);
        }
        puts.push(Put {
            tree: JournalTree::Meta,
            key: AUDIT_HEAD_KEY.to_vec(),
            value: head.encode(),
        });
        let mut journal = self.lock_journal();
        let seq = self.issuance_applied()? + 1;
        journal.append(seq, &puts)?;
        self.journal_syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        #[cfg(test)]
        if self.skip_apply.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(outcomes);
        }
        if let Err(e) = self.apply_issuance(seq, &puts) {
            // The batch is durable but not in the trees: a later batch must not be decided on
            // trees that lack it. A restart applies it from the journal.
            journal.fail(format!("applying batch {seq}: {e}"));
            return Err(e);
        }
        let reset_bytes = self
            .journal_reset_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if journal.len() > reset_bytes {
            // Everything the journal holds is in the trees; once sled has synced them, the
            // journal can start over. This batch is durable and applied whatever happens
            // here, so its answers stand; a failure stops the journal instead.
            if let Err(e) = self.sync_sled().and_then(|()| journal.reset()) {
                tracing::error!(error = %e, "emptying the issuance journal failed; refusing further enrollments");
                journal.fail(format!("emptying the journal: {e}"));
            }
        }
        Ok(outcomes)
    }

    /// Empties the issuance journal once it passes `bytes` instead of 32 MiB (tests of the
    /// reset).
    #[cfg(test)]
    pub(in crate::store) fn danger_reset_journal_past(&self, bytes: u64) {
        self.journal_reset_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes and releases the write turn as a sled writer does, without its sync (tests).
    #[cfg(test)]
    pub(in crate::store) fn danger_note_unsynced_change(&self) {
        drop(self.writing());
    }

    /// Queues `job` without starting a committer (tests of what a committer takes).
    #[cfg(test)]
    pub(in crate::store) fn danger_queue(&self, job: IssueJob) {
        self.issue_queue
            .lock()
            .unpoisoned()
            .jobs
            .push(std::sync::Arc::new(job));
    }

    /// The issuance journal's length now (tests of its reset).
    #[cfg(test)]
    pub(in crate::store) fn journal_len(&self) -> u64 {
        self.lock_journal().len()
    }

    /// Journals the next batches without applying them, as if the process died between
    /// the journal's sync and the inserts (tests of recovery).
    #[cfg(test)]
    pub(in crate::store) fn danger_skip_apply(&self) {
        self.skip_apply
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The write turn as the issuance committer takes it: its changes are durable through
    /// the journal, so releasing it counts nothing.
    pub(super) fn journal_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_turn.lock().unpoisoned()
    }
}
