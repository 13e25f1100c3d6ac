//! Decisions, nonce claims and the daily ledger on PostgreSQL, shared by every payra process
//! on the database.
//!
//! Each process runs `store.decision_writers` writers. One takes every decision waiting (up to [`MAX_BATCH`]) and
//! records them in one transaction of a few statements: claim the nonces (a unique key:
//! a nonce claimed by any process is a replay), re-read the certificates' revocation state,
//! lock the customers' ledger buckets (in key order), let the RA decide each in turn, add the
//! reservations, append the decisions to the process's own hash chain. One commit then
//! answers every decision of the batch.
//!
//! A chain belongs to one writer of one process start (`decision_chains`), so chains need no
//! lock across writers or processes; `payra audit verify` checks each. Writers lock nonces
//! (in key order) before buckets (in key order), so two batches never wait for each other in
//! a cycle.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};

use super::{append_audit, db_error, in_transaction, pool_error, Committed};
use crate::error::{Error, Result};
use crate::store::audit::{AuditEvent, GENESIS_HASH};
use crate::store::records::{CertificateSummary, EvidenceRecord, Revocation};
use crate::store::{
    DecisionContext, DecisionFuture, DecisionJob, Decisions, LogRecord, NonceCheck,
    ReleaseRejection,
};

/// The most decisions one transaction records.
const MAX_BATCH: usize = 512;

/// The most decisions a process lets wait for its writers; more are answered UNAVAILABLE
/// at once (a database that stopped must not turn into unbounded memory).
const MAX_WAITING: usize = 16_384;

/// How often a batch that PostgreSQL aborted for a deadlock or a serialization failure is
/// tried again before its decisions are answered UNAVAILABLE.
const RETRIES: usize = 3;

struct Pending {
    job: DecisionJob,
    reply: tokio::sync::oneshot::Sender<Result<()>>,
}

/// [`Decisions`] on PostgreSQL.
pub struct PgDecisions {
    queue: tokio::sync::mpsc::Sender<Pending>,
    pool: Pool,
    handle: tokio::runtime::Handle,
    write_turn: Arc<tokio::sync::Mutex<()>>,
    /// How long a claim can matter after its intent was created
    /// ([`crate::store::DecisionSetup::claim_horizon_ms`]); until the RA opens the
    /// decisions, no claim is purged.
    pub(super) claim_horizon_ms: std::sync::atomic::AtomicI64,
}

/// The writer's chain: its id once created, and its head as last committed (`None` after a
/// failed commit, whose outcome may be either: it is read back before the next batch).
#[derive(Default)]
struct WriterState {
    id: Option<i64>,
    head: Option<ChainHead>,
}

/// Where this process's chain stands.
#[derive(Clone, Copy)]
struct ChainHead {
    id: i64,
    seq: i64,
    hash: [u8; 32],
}

impl PgDecisions {
    /// Starts the writer on `handle`.
    pub(super) fn start(
        pool: Pool,
        handle: tokio::runtime::Handle,
        write_turn: Arc<tokio::sync::Mutex<()>>,
        now_ms: i64,
        writers: usize,
    ) -> PgDecisions {
        let (queue, rx) = tokio::sync::mpsc::channel(MAX_WAITING);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            handle.spawn(writer(pool.clone(), rx.clone(), now_ms));
        }
        PgDecisions {
            queue,
            pool,
            handle,
            write_turn,
            claim_horizon_ms: std::sync::atomic::AtomicI64::new(i64::MAX),
        }
    }

    fn block<T, F>(&self, work: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        super::block_on(&self.handle, work)
    }
}

/// The evidence id of decision `seq` of chain `chain`: `ev_`, 16 hex digits of the chain
/// (upper 24 bits) and number (lower 40), 16 random hex digits.
fn evidence_id(chain: i64, seq: i64) -> String {
    let number = ((chain as u64) << 40) | (seq as u64 & ((1 << 40) - 1));
    format!("ev_{number:016x}{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// `SHA-256(prev || record)`.
fn link(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(record);
    hasher.finalize().into()
}

async fn writer(
    pool: Pool,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Pending>>>,
    started_at_ms: i64,
) {
    let mut head = WriterState::default();
    loop {
        // One writer at a time takes what is waiting; the other may be committing.
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            // A caller that stopped waiting (its deadline passed while the database was slow
            // or away) gets no decision: recording it would claim its nonce and reserve its
            // amount for an answer nobody received.
            batch.retain(|pending| !pending.reply.is_closed());
            batch
        };
        if batch.is_empty() {
            continue;
        }
        let mut outcome = Err(Error::Unavailable("not tried".into()));
        let mut attempted = Vec::new();
        for _ in 0..RETRIES {
            attempted.clear();
            outcome = commit(&pool, &mut head, started_at_ms, &batch, &mut attempted).await;
            match &outcome {
                Err(Error::Unavailable(why))
                    if why.contains("deadlock") || why.contains("serializ") =>
                {
                    continue
                }
                _ => break,
            }
        }
        // A connection lost while committing leaves the outcome unknown: look on a fresh one.
        if let (Err(Error::Unavailable(_)), Some(first)) = (&outcome, attempted.first()) {
            if recorded(&pool, first).await {
                tracing::warn!(
                    "a batch of decisions committed although its commit's answer was lost"
                );
                outcome = Ok(());
            }
        }
        match outcome {
            Ok(()) => {
                for pending in batch {
                    let _ = pending.reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, decisions = batch.len(), "recording decisions failed");
                for pending in batch {
                    let _ = pending.reply.send(Err(match &e {
                        Error::Unavailable(m) => Error::Unavailable(m.clone()),
                        other => Error::internal(format!("recording a decision: {other}")),
                    }));
                }
            }
        }
    }
}

/// Whether the decision `evidence_id` is in the database (false if that cannot be read).
async fn recorded(pool: &Pool, evidence_id: &str) -> bool {
    let Ok(client) = pool.get().await else {
        return false;
    };
    let Ok(statement) = super::prepared(
        &client,
        "SELECT EXISTS (SELECT 1 FROM decisions WHERE evidence_id = $1)",
    )
    .await
    else {
        return false;
    };
    client
        .query_one(&statement, &[&evidence_id])
        .await
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Records `batch` in one transaction; moves `head` only once it is committed. `attempted`
/// gets the evidence ids the transaction writes, before it commits.
async fn commit(
    pool: &Pool,
    state: &mut WriterState,
    started_at_ms: i64,
    batch: &[Pending],
    attempted: &mut Vec<String>,
) -> Result<()> {
    let known = state.head.take();
    let start = match (known, state.id) {
        (Some(head), _) => head,
        (None, Some(id)) => {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one(
                    &super::prepared(
                        &client,
                        "SELECT seq, hash FROM decision_chains WHERE id = $1",
                    )
                    .await?,
                    &[&id],
                )
                .await
                .map_err(db_error)?;
            let hash: Vec<u8> = row.get(1);
            ChainHead {
                id,
                seq: row.get(0),
                hash: <[u8; 32]>::try_from(hash.as_slice())
                    .map_err(|_| Error::internal("a decision chain's hash is not 32 bytes"))?,
            }
        }
        (None, None) => {
            let client = pool.get().await.map_err(pool_error)?;
            let id: i64 = client
                .query_one(
                    &super::prepared(
                        &client,
                        "INSERT INTO decision_chains (started_at_ms) VALUES ($1) RETURNING id",
                    )
                    .await?,
                    &[&started_at_ms],
                )
                .await
                .map_err(db_error)?
                .get(0);
            let fresh = ChainHead {
                id,
                seq: 0,
                hash: GENESIS_HASH,
            };
            state.id = Some(id);
            fresh
        }
    };
    let jobs: Vec<&DecisionJob> = batch.iter().map(|p| &p.job).collect();
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    {
        // Nonces: the first job of the batch with a key claims it; the database says
        // whether an earlier batch (of any process) did.
        let mut first_claim: HashMap<&[u8], usize> = HashMap::new();
        let mut claims: Vec<(&[u8], i64)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            if let Some((key, expires)) = &job.nonce {
                if !first_claim.contains_key(key.as_slice()) {
                    first_claim.insert(key, i);
                    claims.push((key, *expires));
                }
            }
        }
        claims.sort();
        let mut claimed: HashSet<Vec<u8>> = HashSet::new();
        if !claims.is_empty() {
            let keys: Vec<&[u8]> = claims.iter().map(|c| c.0).collect();
            let expiries: Vec<i64> = claims.iter().map(|c| c.1).collect();
            // A claim may be taken over only once it expired for every decision of the batch.
            let now_ms = jobs.iter().map(|job| job.now_ms).min().unwrap_or(0);
            let rows = tx
                .query(
                    &super::prepared_tx(
                        &tx,
                        "INSERT INTO nonces (key, expires_at_ms) \
                         SELECT * FROM UNNEST($1::bytea[], $2::bigint[]) \
                         ON CONFLICT (key) DO UPDATE SET expires_at_ms = EXCLUDED.expires_at_ms \
                         WHERE nonces.expires_at_ms < $3 RETURNING key",
                    )
                    .await?,
                    &[&keys, &expiries, &now_ms],
                )
                .await
                .map_err(db_error)?;
            claimed = rows.iter().map(|row| row.get::<_, Vec<u8>>(0)).collect();
        }

        // The certificates' revocation state, as committed now.
        let serials: Vec<&[u8]> = jobs
            .iter()
            .filter_map(|job| job.recheck.as_ref().map(|s| s.as_bytes()))
            .collect();
        let mut states: HashMap<Vec<u8>, Option<Revocation>> = HashMap::new();
        if !serials.is_empty() {
            for row in tx
                .query(
                    &super::prepared_tx(&tx, super::summaries::SUMMARIES_OF).await?,
                    &[&serials],
                )
                .await
                .map_err(db_error)?
            {
                let serial: Vec<u8> = row.get(0);
                let summary: Vec<u8> = row.get(1);
                let summary = CertificateSummary::decode(&serial, &summary)?;
                states.insert(serial, summary.revocation);
            }
        }

        // The customers' buckets, created if new, then locked in key order.
        let mut buckets: Vec<&[u8]> = jobs
            .iter()
            .filter_map(|job| job.buckets.as_ref())
            .flat_map(|b| b.iter().map(Vec::as_slice))
            .collect();
        buckets.sort();
        buckets.dedup();
        let mut used: HashMap<Vec<u8>, i64> = HashMap::new();
        if !buckets.is_empty() {
            let days: Vec<String> = buckets
                .iter()
                .map(|b| String::from_utf8_lossy(crate::store::ledger_day(b)).into_owned())
                .collect();
            tx.execute(
                &super::prepared_tx(
                    &tx,
                    "INSERT INTO ledger (bucket, day, used_fen) \
                     SELECT b, d, 0 FROM UNNEST($1::bytea[], $2::text[]) AS v(b, d) \
                     ON CONFLICT (bucket) DO NOTHING",
                )
                .await?,
                &[&buckets, &days],
            )
            .await
            .map_err(db_error)?;
            for row in tx
                .query(
                    &super::prepared_tx(
                        &tx,
                        "SELECT bucket, used_fen FROM ledger WHERE bucket = ANY($1) \
                         ORDER BY bucket FOR UPDATE",
                    )
                    .await?,
                    &[&buckets],
                )
                .await
                .map_err(db_error)?
            {
                used.insert(row.get(0), row.get(1));
            }
        }
        let before = used.clone();

        // Each decision in turn, seeing the reservations of those before it.
        let mut head = start;
        let mut rows_seq = Vec::with_capacity(jobs.len());
        let mut rows_id = Vec::with_capacity(jobs.len());
        let mut rows_bucket: Vec<Option<Vec<u8>>> = Vec::with_capacity(jobs.len());
        let mut rows_reserved = Vec::with_capacity(jobs.len());
        let mut rows_record = Vec::with_capacity(jobs.len());
        let mut rows_hash = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            let seq = head.seq + 1;
            let id = evidence_id(head.id, seq);
            let replayed = match &job.nonce {
                Some((key, _)) => {
                    first_claim.get(key.as_slice()) != Some(&i) || !claimed.contains(key)
                }
                None => false,
            };
            let nonce = if replayed {
                NonceCheck::Replayed
            } else {
                NonceCheck::Claimed
            };
            let context = DecisionContext {
                evidence_id: id.clone(),
                certificate: job
                    .recheck
                    .as_ref()
                    .and_then(|serial| states.get(serial.as_bytes()).copied()),
                nonce,
                used: job
                    .buckets
                    .as_ref()
                    .map(|b| [0, 1, 2, 3].map(|t| used.get(&b[t]).copied().unwrap_or(0))),
            };
            let decided = (job.decide)(&context)?;
            let mut bucket = None;
            let mut reserved = 0;
            if let (Some((index, amount)), Some(buckets)) = (decided.reserve, &job.buckets) {
                let key = buckets
                    .get(index)
                    .ok_or_else(|| Error::internal("reservation names no bucket"))?;
                *used.entry(key.clone()).or_insert(0) += amount;
                bucket = Some(key.clone());
                reserved = amount;
            }
            let record = serde_json::to_string(&decided.record)
                .map_err(|e| Error::internal(format!("encoding a decision: {e}")))?;
            let hash = link(&head.hash, record.as_bytes());
            head = ChainHead {
                id: head.id,
                seq,
                hash,
            };
            rows_seq.push(seq);
            rows_id.push(id);
            rows_bucket.push(bucket);
            rows_reserved.push(reserved);
            rows_record.push(record);
            rows_hash.push(hash.to_vec());
        }

        let changed: Vec<(&Vec<u8>, &i64)> = used
            .iter()
            .filter(|(key, value)| before.get(*key) != Some(value))
            .collect();
        if !changed.is_empty() {
            let keys: Vec<&[u8]> = changed.iter().map(|(k, _)| k.as_slice()).collect();
            let values: Vec<i64> = changed.iter().map(|(_, v)| **v).collect();
            tx.execute(
                &super::prepared_tx(
                    &tx,
                    "UPDATE ledger SET used_fen = v.used FROM \
                     UNNEST($1::bytea[], $2::bigint[]) AS v(bucket, used) \
                     WHERE ledger.bucket = v.bucket",
                )
                .await?,
                &[&keys, &values],
            )
            .await
            .map_err(db_error)?;
        }
        tx.execute(&super::prepared_tx(&tx, "INSERT INTO decisions (chain, seq, evidence_id, bucket, reserved_fen, record, hash) \
                 SELECT $1::bigint, * FROM UNNEST($2::bigint[], $3::text[], $4::bytea[], $5::bigint[], \
                 $6::text[], $7::bytea[])").await?,
                &[
                    &head.id,
                    &rows_seq,
                    &rows_id,
                    &rows_bucket,
                    &rows_reserved,
                    &rows_record,
                    &rows_hash,
                ],
            )
            .await
            .map_err(db_error)?;
        tx.execute(
            &super::prepared_tx(
                &tx,
                "UPDATE decision_chains SET seq = $2, hash = $3 WHERE id = $1",
            )
            .await?,
            &[&head.id, &head.seq, &head.hash.as_slice()],
        )
        .await
        .map_err(db_error)?;
        attempted.clone_from(&rows_id);
        tx.commit().await.map_err(db_error)?;
        state.head = Some(head);
        Ok(())
    }
}

impl Decisions for PgDecisions {
    fn decide(&self, job: DecisionJob) -> DecisionFuture {
        let (reply, rx) = tokio::sync::oneshot::channel();
        use tokio::sync::mpsc::error::TrySendError;
        match self.queue.try_send(Pending { job, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(refused)) => {
                let _ = refused.reply.send(Err(Error::Unavailable(format!(
                    "{MAX_WAITING} decisions are waiting for the database; retry, or on another \
                     replica"
                ))));
            }
            Err(TrySendError::Closed(refused)) => {
                let _ = refused.reply.send(Err(Error::Unavailable(
                    "the decision writer has stopped".into(),
                )));
            }
        }
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::Unavailable("the decision writer has stopped".into()))?
        })
    }

    fn release(
        &self,
        evidence_id: &str,
        buckets: &[Vec<u8>; 4],
        now_ms: i64,
        audit: &AuditEvent,
    ) -> Result<std::result::Result<[i64; 4], ReleaseRejection>> {
        let (pool, turn) = (self.pool.clone(), self.write_turn.clone());
        let (evidence_id, buckets, audit) =
            (evidence_id.to_string(), buckets.clone(), audit.clone());
        self.block(async move {
            let _turn = turn.lock().await;
            in_transaction(&pool, move |tx| {
                Box::pin(async move {
                    let Some(row) = tx.query_opt(&super::prepared_tx(tx, "SELECT bucket, reserved_fen, released_at_ms FROM decisions \
                             WHERE evidence_id = $1 FOR UPDATE").await?,
                            &[&evidence_id],
                        )
                        .await
                        .map_err(db_error)?
                    else {
                        return Ok(Committed::No(Err(ReleaseRejection::NotFound)));
                    };
                    let bucket: Option<Vec<u8>> = row.get(0);
                    let reserved: i64 = row.get(1);
                    if let Some(released_at_ms) = row.get::<_, Option<i64>>(2) {
                        return Ok(Committed::No(Err(ReleaseRejection::AlreadyReleased {
                            released_at_ms,
                        })));
                    }
                    let Some(bucket) = bucket.filter(|_| reserved > 0) else {
                        return Ok(Committed::No(Err(ReleaseRejection::NothingReserved)));
                    };
                    tx.execute(&super::prepared_tx(tx, "UPDATE decisions SET released_at_ms = $2 WHERE evidence_id = $1").await?,
                        &[&evidence_id, &now_ms],
                    )
                    .await
                    .map_err(db_error)?;
                    tx.execute(&super::prepared_tx(tx, "UPDATE ledger SET used_fen = GREATEST(used_fen - $2, 0) WHERE bucket = $1").await?,
                        &[&bucket, &reserved],
                    )
                    .await
                    .map_err(db_error)?;
                    let keys: Vec<&[u8]> = buckets.iter().map(Vec::as_slice).collect();
                    let mut used: HashMap<Vec<u8>, i64> = HashMap::new();
                    for row in tx.query(&super::prepared_tx(tx, "SELECT bucket, used_fen FROM ledger WHERE bucket = ANY($1)").await?,
                            &[&keys],
                        )
                        .await
                        .map_err(db_error)?
                    {
                        used.insert(row.get(0), row.get(1));
                    }
                    append_audit(tx, &audit).await?;
                    Ok(Committed::Yes(Ok(
                        [0, 1, 2, 3].map(|t| used.get(&buckets[t]).copied().unwrap_or(0))
                    )))
                })
            })
            .await
        })
    }

    fn evidence(&self, evidence_id: &str) -> Result<Option<EvidenceRecord>> {
        let pool = self.pool.clone();
        let evidence_id = evidence_id.to_string();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let Some(row) = client
                .query_opt(
                    &super::prepared(
                        &client,
                        "SELECT record, released_at_ms FROM decisions WHERE evidence_id = $1",
                    )
                    .await?,
                    &[&evidence_id],
                )
                .await
                .map_err(db_error)?
            else {
                return Ok(None);
            };
            let record: String = row.get(0);
            match serde_json::from_str::<LogRecord>(&record) {
                Ok(LogRecord::Decision { evidence, .. }) => {
                    let mut evidence = *evidence;
                    evidence.released_at_ms = row.get(1);
                    Ok(Some(evidence))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(Error::internal(format!("decoding a decision: {e}"))),
            }
        })
    }

    fn used(&self, buckets: &[Vec<u8>; 4]) -> Result<[i64; 4]> {
        let pool = self.pool.clone();
        let buckets = buckets.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let keys: Vec<&[u8]> = buckets.iter().map(Vec::as_slice).collect();
            let mut used: HashMap<Vec<u8>, i64> = HashMap::new();
            for row in client
                .query(
                    &super::prepared(
                        &client,
                        "SELECT bucket, used_fen FROM ledger WHERE bucket = ANY($1)",
                    )
                    .await?,
                    &[&keys],
                )
                .await
                .map_err(db_error)?
            {
                used.insert(row.get(0), row.get(1));
            }
            Ok([0, 1, 2, 3].map(|t| used.get(&buckets[t]).copied().unwrap_or(0)))
        })
    }

    fn purge_nonces(&self, now_ms: i64) -> Result<usize> {
        // Claims are kept a horizon longer than they can matter: a decision still queued, or
        // drafted on a replica whose clock is behind, must find its claim.
        let horizon = self
            .claim_horizon_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now_ms = now_ms.saturating_sub(horizon);
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            // In key order, a batch at a time, skipping rows a writer holds: the writers lock
            // claims in key order too, so the two never wait for each other in a cycle.
            let mut purged = 0usize;
            loop {
                let deleted = client
                    .execute(
                        &super::prepared(
                            &client,
                            "DELETE FROM nonces WHERE key IN (SELECT key FROM nonces \
                             WHERE expires_at_ms < $1 ORDER BY key LIMIT 10000 \
                             FOR UPDATE SKIP LOCKED)",
                        )
                        .await?,
                        &[&now_ms],
                    )
                    .await
                    .map_err(db_error)?;
                purged += usize::try_from(deleted).unwrap_or(usize::MAX);
                if deleted < 10_000 {
                    return Ok(purged);
                }
            }
        })
    }

    fn verify_chains(&self) -> Result<std::result::Result<u64, String>> {
        let pool = self.pool.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let chains = client.query(&super::prepared(&client, "SELECT id, seq, hash FROM decision_chains ORDER BY id").await?, &[])
                .await
                .map_err(db_error)?;
            let mut checked = 0u64;
            for chain in chains {
                let id: i64 = chain.get(0);
                let head_seq: i64 = chain.get(1);
                let head_hash: Vec<u8> = chain.get(2);
                let mut prev = GENESIS_HASH;
                let mut expected = 1i64;
                let mut after = 0i64;
                loop {
                    let rows = client.query(&super::prepared(&client, "SELECT seq, record, hash FROM decisions WHERE chain = $1 AND seq > $2 \
                             AND seq <= $3 ORDER BY seq LIMIT 4096").await?,
                            &[&id, &after, &head_seq],
                        )
                        .await
                        .map_err(db_error)?;
                    if rows.is_empty() {
                        break;
                    }
                    for row in &rows {
                        let seq: i64 = row.get(0);
                        let record: String = row.get(1);
                        let hash: Vec<u8> = row.get(2);
                        if seq != expected {
                            return Ok(Err(format!(
                                "decision chain {id}: decision {expected} is missing (found {seq})"
                            )));
                        }
                        let computed = link(&prev, record.as_bytes());
                        if computed.as_slice() != hash.as_slice() {
                            return Ok(Err(format!(
                                "decision chain {id}: decision {seq} does not match its hash \
                                 (changed after it was recorded)"
                            )));
                        }
                        prev = computed;
                        expected += 1;
                        after = seq;
                        checked += 1;
                    }
                }
                if after != head_seq || prev.as_slice() != head_hash.as_slice() {
                    return Ok(Err(format!(
                        "decision chain {id}: its head names decision {head_seq}, the chain \
                         ends at {after}"
                    )));
                }
            }
            Ok(Ok(checked))
        })
    }
}
