//! New tokens and enrollments on PostgreSQL, committed in batches.
//!
//! Every audited change locks the audit chain's head, so changes commit one at a time across
//! all processes; one transaction per token or enrollment would cap them at one commit (a WAL
//! flush) each. So each process queues them, and one committer takes everything waiting and
//! writes it in one transaction of a few statements whatever its size: the new tokens, the
//! used tokens locked in hash order, the device keys locked (a transaction lock per key, in
//! order), the certificates and the token updates, and their audit entries. Each enrollment
//! is decided in queue order, seeing the ones before it in the batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use sha2::Digest;

use super::{db_error, json, pool_error, prepared_tx};
use crate::error::{Error, Result};
use crate::model::RevocationReason;
use crate::store::audit::{chain_hash, AuditBody, AuditEntry, AuditEvent};
use crate::store::records::{
    CertificateRecord, CertificateSummary, KeyRefusal, TokenHash, TokenRecord,
};
use crate::store::{IssueOutcome, OnIssued, TokenRejection};

/// The most jobs one transaction takes.
const MAX_BATCH: usize = 256;

/// The most jobs a process lets wait for the committer; more are answered UNAVAILABLE.
pub(super) const MAX_WAITING: usize = 8_192;

/// One enrollment or new token.
pub(super) enum IssueWork {
    Enroll {
        hash: TokenHash,
        now_s: i64,
        certificate: Box<CertificateRecord>,
    },
    Token {
        hash: TokenHash,
        token: TokenRecord,
    },
}

pub(super) struct IssueJob {
    pub work: IssueWork,
    pub audit: AuditEvent,
    pub on_issued: Option<OnIssued>,
    pub reply: tokio::sync::oneshot::Sender<Result<IssueOutcome>>,
}

/// Commits queued jobs until the queue's senders are gone.
pub(super) async fn committer(
    pool: Pool,
    turn: Arc<tokio::sync::Mutex<()>>,
    mut queue: tokio::sync::mpsc::Receiver<IssueJob>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A caller that stopped waiting (its deadline passed) gets no enrollment: the token
        // stays unused for its retry.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (work, waiting): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|job| ((job.work, job.audit), (job.on_issued, job.reply)))
            .unzip();
        // Held from before the commit until every follow-up ran: the RA's memory gets each
        // certificate before any later change to it made through this process.
        let _turn = turn.lock().await;
        let mut outcome = Err(Error::Unavailable("not tried".into()));
        let mut decided = Vec::new();
        for _ in 0..3 {
            decided.clear();
            outcome = commit(&pool, &work, &mut decided).await;
            match &outcome {
                Err(Error::Unavailable(why))
                    if why.contains("deadlock") || why.contains("serializ") => {}
                _ => break,
            }
        }
        // A connection lost while committing leaves the outcome unknown: look on a fresh one
        // for something the batch wrote.
        if matches!(outcome, Err(Error::Unavailable(_)))
            && !decided.is_empty()
            && committed(&pool, &work, &decided).await
        {
            tracing::warn!(
                "a batch of enrollments committed although its commit's answer was lost"
            );
            outcome = Ok(decided);
        }
        match outcome {
            Ok(outcomes) => {
                for ((on_issued, reply), outcome) in waiting.into_iter().zip(outcomes) {
                    if outcome == IssueOutcome::Issued {
                        if let Some(on_issued) = on_issued {
                            on_issued();
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = waiting.len(), "committing enrollments failed");
                for (_, reply) in waiting {
                    let _ = reply.send(Err(match &e {
                        Error::Unavailable(m) => Error::Unavailable(m.clone()),
                        other => Error::internal(format!("committing an enrollment: {other}")),
                    }));
                }
            }
        }
    }
}

/// The transaction lock of a device key.
fn key_lock(public_key: &[u8; 65]) -> i64 {
    let digest = sha2::Sha256::digest(public_key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Takes the transaction locks of `records`' keys, in the one order every process uses. A
/// keyCompromise revocation holds them as it commits, as an enrollment batch does while it
/// reads the key's certificates and stores a new one: an enrollment either commits first
/// (and the revocation's second look, `Ra::revoke_batch`, finds its certificate) or reads
/// the revocation and is refused. The certificate rows are locked before the keys, as a
/// renewal locks them, so the two never wait on each other in a cycle.
pub(super) async fn lock_keys_of(
    tx: &deadpool_postgres::Transaction<'_>,
    records: &[CertificateRecord],
) -> Result<()> {
    let mut locks = records
        .iter()
        .map(|record| Ok(key_lock(&CertificateSummary::of(record)?.public_key)))
        .collect::<Result<Vec<i64>>>()?;
    locks.sort();
    locks.dedup();
    tx.execute(
        &prepared_tx(
            tx,
            "SELECT pg_advisory_xact_lock(l) FROM (SELECT unnest($1::bigint[]) AS l) AS locks",
        )
        .await?,
        &[&locks],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Why `certificate`'s key may not be certified now, if it may not (for a renewal, one
/// certificate at a time): another customer's or device's live certificate holds it, or it
/// was reported compromised. Takes the key's transaction lock first, as a batch does.
pub(super) async fn key_refusal(
    tx: &deadpool_postgres::Transaction<'_>,
    certificate: &CertificateRecord,
    now_s: i64,
) -> Result<Option<Error>> {
    let key = CertificateSummary::of(certificate)?.public_key;
    tx.execute(
        &prepared_tx(tx, "SELECT pg_advisory_xact_lock($1)").await?,
        &[&key_lock(&key)],
    )
    .await
    .map_err(db_error)?;
    let rows = tx
        .query(
            &prepared_tx(
                tx,
                "SELECT serial, summary FROM certificates WHERE public_key = $1",
            )
            .await?,
            &[&key.as_slice()],
        )
        .await
        .map_err(db_error)?;
    let holders = rows
        .iter()
        .map(|row| {
            let serial: Vec<u8> = row.get(0);
            let summary: Vec<u8> = row.get(1);
            CertificateSummary::decode(&serial, &summary)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KeyRefusal::of(
        &holders,
        &certificate.customer_id,
        &certificate.device_id,
        now_s,
    )
    .map(|refusal| refusal.error()))
}

/// Who holds a key, as the batch decides: (customer, device, usable again later?).
struct Holder {
    customer: String,
    device: String,
    /// Unrevoked or on hold, unexpired at the enrollment's time.
    live_until_s: i64,
    compromised: bool,
}

/// Whether the batch whose jobs were decided `decided` is in the database: the first
/// certificate or token it wrote is there (false if that cannot be read).
async fn committed(
    pool: &Pool,
    batch: &[(IssueWork, AuditEvent)],
    decided: &[IssueOutcome],
) -> bool {
    let written = batch
        .iter()
        .zip(decided)
        .find(|(_, outcome)| **outcome == IssueOutcome::Issued)
        .map(|((work, _), _)| match work {
            IssueWork::Enroll { certificate, .. } => (
                "SELECT EXISTS (SELECT 1 FROM certificates WHERE serial = $1)",
                certificate.serial.as_bytes().to_vec(),
            ),
            IssueWork::Token { hash, .. } => (
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE hash = $1)",
                hash.0.to_vec(),
            ),
        });
    let Some((sql, key)) = written else {
        return false;
    };
    let Ok(client) = pool.get().await else {
        return false;
    };
    let Ok(statement) = super::prepared(&client, sql).await else {
        return false;
    };
    client
        .query_one(&statement, &[&key])
        .await
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Writes `batch` in one transaction; returns each job's outcome, in order. `decided` gets
/// the outcomes before the commit.
async fn commit(
    pool: &Pool,
    batch: &[(IssueWork, AuditEvent)],
    decided: &mut Vec<IssueOutcome>,
) -> Result<Vec<IssueOutcome>> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;

    // New tokens first: an enrollment later in the batch may use one.
    let mut new_hashes: Vec<&[u8]> = Vec::new();
    let mut new_expiries = Vec::new();
    let mut new_records = Vec::new();
    for (work, _) in batch {
        if let IssueWork::Token { hash, token } = work {
            new_hashes.push(hash.0.as_slice());
            new_expiries.push(token.expires_at_s);
            new_records.push(json(token)?);
        }
    }
    if !new_hashes.is_empty() {
        tx.execute(
            &prepared_tx(
                &tx,
                "INSERT INTO tokens (hash, expires_at_s, record) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bigint[], $3::jsonb[])",
            )
            .await?,
            &[&new_hashes, &new_expiries, &new_records],
        )
        .await
        .map_err(db_error)?;
    }

    // The tokens the enrollments use, locked in hash order.
    let mut used: Vec<&[u8]> = Vec::new();
    let mut keys: Vec<[u8; 65]> = Vec::new();
    let mut serials: Vec<&[u8]> = Vec::new();
    for (work, _) in batch {
        if let IssueWork::Enroll {
            hash, certificate, ..
        } = work
        {
            used.push(hash.0.as_slice());
            keys.push(CertificateSummary::of(certificate)?.public_key);
            serials.push(certificate.serial.as_bytes());
        }
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    if used.is_empty() {
        outcomes.resize(batch.len(), IssueOutcome::Issued);
    } else {
        used.sort();
        used.dedup();
        let mut tokens: HashMap<Vec<u8>, TokenRecord> = HashMap::new();
        for row in tx
            .query(
                &prepared_tx(
                    &tx,
                    "SELECT hash, record FROM tokens WHERE hash = ANY($1) ORDER BY hash FOR UPDATE",
                )
                .await?,
                &[&used],
            )
            .await
            .map_err(db_error)?
        {
            tokens.insert(row.get(0), super::decode_json(row.get(1))?);
        }
        // The keys, each under a transaction lock taken in one order by every process.
        let mut locks: Vec<i64> = keys.iter().map(key_lock).collect();
        locks.sort();
        locks.dedup();
        tx.execute(
            &prepared_tx(
                &tx,
                "SELECT pg_advisory_xact_lock(l) FROM (SELECT unnest($1::bigint[]) AS l) AS locks",
            )
            .await?,
            &[&locks],
        )
        .await
        .map_err(db_error)?;
        let key_params: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let mut holders: HashMap<[u8; 65], Vec<Holder>> = HashMap::new();
        for row in tx
            .query(
                &prepared_tx(
                    &tx,
                    "SELECT serial, summary FROM certificates WHERE public_key = ANY($1)",
                )
                .await?,
                &[&key_params],
            )
            .await
            .map_err(db_error)?
        {
            let serial: Vec<u8> = row.get(0);
            let summary: Vec<u8> = row.get(1);
            let summary = CertificateSummary::decode(&serial, &summary)?;
            let revocation = summary.revocation.map(|r| r.reason);
            holders.entry(summary.public_key).or_default().push(Holder {
                customer: summary.customer_id.as_str().to_string(),
                device: summary.device_id.as_str().to_string(),
                live_until_s: match revocation {
                    None | Some(RevocationReason::CertificateHold) => summary.not_after_s,
                    Some(_) => i64::MIN,
                },
                compromised: revocation == Some(RevocationReason::KeyCompromise),
            });
        }
        let taken: HashSet<Vec<u8>> = tx
            .query(
                &prepared_tx(
                    &tx,
                    "SELECT serial FROM certificates WHERE serial = ANY($1)",
                )
                .await?,
                &[&serials],
            )
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.get(0))
            .collect();

        // Each enrollment in queue order, seeing those before it.
        let mut batch_serials: HashSet<&[u8]> = HashSet::new();
        for (work, _) in batch {
            let IssueWork::Enroll {
                hash,
                now_s,
                certificate,
            } = work
            else {
                outcomes.push(IssueOutcome::Issued);
                continue;
            };
            let outcome = match tokens.get(hash.0.as_slice()) {
                None => IssueOutcome::TokenRejected(TokenRejection::Unknown),
                Some(token) => match crate::store::token_usable(token.clone(), *now_s) {
                    Err(why) => IssueOutcome::TokenRejected(why),
                    Ok(_) => {
                        let key = CertificateSummary::of(certificate)?.public_key;
                        let known = holders.get(&key).map(Vec::as_slice).unwrap_or_default();
                        if known.iter().any(|h| h.compromised) {
                            IssueOutcome::KeyCompromised
                        } else if known.iter().any(|h| {
                            h.live_until_s > *now_s
                                && (h.customer != certificate.customer_id.as_str()
                                    || h.device != certificate.device_id.as_str())
                        }) {
                            IssueOutcome::KeyHeldElsewhere
                        } else if taken.contains(certificate.serial.as_bytes())
                            || !batch_serials.insert(certificate.serial.as_bytes())
                        {
                            IssueOutcome::SerialTaken
                        } else {
                            IssueOutcome::Issued
                        }
                    }
                },
            };
            if outcome == IssueOutcome::Issued {
                let mut token = tokens
                    .get(hash.0.as_slice())
                    .cloned()
                    .ok_or_else(|| Error::internal("an issued enrollment lost its token"))?;
                token.used_at_s = Some(*now_s);
                token.used_for_serial = Some(certificate.serial.clone());
                tokens.insert(hash.0.to_vec(), token);
                let key = CertificateSummary::of(certificate)?.public_key;
                holders.entry(key).or_default().push(Holder {
                    customer: certificate.customer_id.as_str().to_string(),
                    device: certificate.device_id.as_str().to_string(),
                    live_until_s: certificate.not_after_s,
                    compromised: false,
                });
            }
            outcomes.push(outcome);
        }

        // The certificates and the tokens they used.
        let mut rows = CertificateRows::default();
        let mut token_hashes: Vec<&[u8]> = Vec::new();
        let mut token_records = Vec::new();
        for ((work, _), outcome) in batch.iter().zip(&outcomes) {
            if let (
                IssueWork::Enroll {
                    hash, certificate, ..
                },
                IssueOutcome::Issued,
            ) = (work, outcome)
            {
                rows.push(certificate)?;
                token_hashes.push(hash.0.as_slice());
                let token = tokens
                    .get(hash.0.as_slice())
                    .ok_or_else(|| Error::internal("an issued enrollment lost its token"))?;
                token_records.push(json(token)?);
            }
        }
        if !token_hashes.is_empty() {
            tx.execute(
                &prepared_tx(
                    &tx,
                    "INSERT INTO certificates (serial, customer_id, device_id, not_after_s, \
                     summary, record, public_key) SELECT * FROM UNNEST($1::bytea[], $2::text[], \
                     $3::text[], $4::bigint[], $5::bytea[], $6::jsonb[], $7::bytea[])",
                )
                .await?,
                &[
                    &rows.serials,
                    &rows.customers,
                    &rows.devices,
                    &rows.not_after,
                    &rows.summaries,
                    &rows.records,
                    &rows.keys,
                ],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                &prepared_tx(
                    &tx,
                    "UPDATE tokens SET record = v.record FROM \
                     UNNEST($1::bytea[], $2::jsonb[]) AS v(hash, record) \
                     WHERE tokens.hash = v.hash",
                )
                .await?,
                &[&token_hashes, &token_records],
            )
            .await
            .map_err(db_error)?;
        }
    }

    // One audit entry per job that wrote something, chained after the head (locked last).
    let events: Vec<&AuditEvent> = batch
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| **outcome == IssueOutcome::Issued)
        .map(|((_, audit), _)| audit)
        .collect();
    if !events.is_empty() {
        let head = tx
            .query_one(
                &prepared_tx(
                    &tx,
                    "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
                )
                .await?,
                &[],
            )
            .await
            .map_err(db_error)?;
        let mut seq: i64 = head.get(0);
        let mut hash: Vec<u8> = head.get(1);
        let mut seqs = Vec::with_capacity(events.len());
        let mut entries = Vec::with_capacity(events.len());
        for event in events {
            let body = AuditBody {
                version: 1,
                seq: u64::try_from(seq + 1).map_err(|_| Error::internal("audit sequence"))?,
                prev_hash: hex::encode(&hash),
                event: event.clone(),
            };
            let next = chain_hash(&hash, &body);
            seq += 1;
            hash = next.to_vec();
            seqs.push(seq);
            entries.push(json(&AuditEntry {
                body,
                hash: hex::encode(next),
            })?);
        }
        tx.execute(
            &prepared_tx(
                &tx,
                "INSERT INTO audit (seq, entry) SELECT * FROM UNNEST($1::bigint[], $2::jsonb[])",
            )
            .await?,
            &[&seqs, &entries],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            &prepared_tx(
                &tx,
                "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
            )
            .await?,
            &[&seq, &hash],
        )
        .await
        .map_err(db_error)?;
        decided.clone_from(&outcomes);
        tx.commit().await.map_err(db_error)?;
    } else {
        tx.rollback().await.map_err(db_error)?;
    }
    Ok(outcomes)
}

/// Certificate rows for one multi-row insert.
#[derive(Default)]
struct CertificateRows<'a> {
    serials: Vec<&'a [u8]>,
    customers: Vec<&'a str>,
    devices: Vec<&'a str>,
    not_after: Vec<i64>,
    summaries: Vec<Vec<u8>>,
    records: Vec<serde_json::Value>,
    keys: Vec<Vec<u8>>,
}

impl<'a> CertificateRows<'a> {
    fn push(&mut self, record: &'a CertificateRecord) -> Result<()> {
        let summary = CertificateSummary::of(record)?;
        self.serials.push(record.serial.as_bytes());
        self.customers.push(record.customer_id.as_str());
        self.devices.push(record.device_id.as_str());
        self.not_after.push(record.not_after_s);
        self.summaries.push(summary.encode());
        self.records.push(json(record)?);
        self.keys.push(summary.public_key.to_vec());
        Ok(())
    }
}
