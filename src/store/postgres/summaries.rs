//! Verification cache misses on PostgreSQL ([`Store::certificate_summary_async`]): read on
//! the store's runtime, so no caller's thread waits on the network, and the misses that
//! arrive while earlier ones are being read go together in one statement.
//!
//! [`Store::certificate_summary_async`]: crate::store::Store::certificate_summary_async

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;

use super::{db_error, pool_error, prepared};
use crate::error::{Error, ErrorKind, Result};
use crate::model::Serial;
use crate::store::{CertificateSummary, SummaryReceiver};

/// The summaries of a set of serials (`$1`, `bytea[]`): what a batch of cache misses and a
/// decision's re-read of revocations run. The primary key carries the summary (schema 4),
/// so this reads no table row.
pub(super) const SUMMARIES_OF: &str =
    "SELECT serial, summary FROM certificates WHERE serial = ANY($1)";

/// The summary of one serial (`$1`), from the primary key alone as [`SUMMARIES_OF`].
pub(super) const SUMMARY_OF: &str = "SELECT summary FROM certificates WHERE serial = $1";

/// The certificates counted by standing at `$1` (seconds), of summary version `$2`: the
/// revocation reason (null when not revoked), not yet valid, expired, count, version. The
/// summary's layout (`CertificateSummary::encode`) puts version 1's notBefore at octets
/// 66..74 and the revocation flag and reason code at 82 and 91; a summary of another
/// version (perhaps shorter) is read no further than its version octet: `CASE` evaluates
/// in order. Read from the primary key alone, as [`SUMMARIES_OF`].
pub(super) const COUNT_BY_STANDING: &str = "SELECT CASE WHEN get_byte(summary, 0) <> $2 THEN NULL \
         WHEN get_byte(summary, 82) = 1 THEN get_byte(summary, 91) END, \
     CASE WHEN get_byte(summary, 0) = $2 THEN \
         $1 < ('x' || encode(substring(summary FROM 67 FOR 8), 'hex'))::bit(64)::bigint END, \
     $1 >= not_after_s, count(*), get_byte(summary, 0) \
     FROM certificates GROUP BY 1, 2, 3, 5";

/// One cache miss waiting to be read.
pub(super) struct SummaryRead {
    pub(super) serial: Serial,
    pub(super) answer: tokio::sync::oneshot::Sender<Result<Option<CertificateSummary>>>,
}

/// Statements reading misses at the same time. While they are all busy, new misses wait and
/// go into the next statement together.
const READERS: usize = 4;

/// The most serials one statement reads.
const MAX_BATCH: usize = 256;

/// Queues the read of `serial`'s summary for [`reader`].
pub(super) fn queue(
    reads: &tokio::sync::mpsc::UnboundedSender<SummaryRead>,
    serial: &Serial,
) -> SummaryReceiver {
    let (answer, receiver) = tokio::sync::oneshot::channel();
    // A reader that has stopped (the store is shutting down) drops the sender, and the
    // caller's receiver says so.
    let _ = reads.send(SummaryRead {
        serial: serial.clone(),
        answer,
    });
    receiver
}

/// Reads queued misses until the store is dropped: each batch is what has queued up, at
/// most [`MAX_BATCH`], read by one statement while at most [`READERS`] run.
pub(super) async fn reader(
    pool: Pool,
    mut reads: tokio::sync::mpsc::UnboundedReceiver<SummaryRead>,
) {
    let readers = Arc::new(tokio::sync::Semaphore::new(READERS));
    loop {
        let Ok(permit) = readers.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = reads.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match reads.try_recv() {
                Ok(read) => batch.push(read),
                Err(_) => break,
            }
        }
        // A caller that went away (a cancelled RPC) is not read for. The queue holds at most
        // one read per waiting verification, so it is as long as the calls in flight.
        batch.retain(|read| !read.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let found = read_batch(&pool, &batch).await;
            for read in batch {
                let answer = match &found {
                    Ok(found) => found
                        .get(read.serial.as_bytes())
                        .map(|bytes| CertificateSummary::decode(read.serial.as_bytes(), bytes))
                        .transpose(),
                    Err(e) => Err(shared(e)),
                };
                // A caller that went away (a cancelled RPC) does not need its answer.
                let _ = read.answer.send(answer);
            }
            drop(permit);
        });
    }
}

/// The stored summaries of `batch`'s serials, by serial.
async fn read_batch(pool: &Pool, batch: &[SummaryRead]) -> Result<HashMap<Vec<u8>, Vec<u8>>> {
    let serials: Vec<&[u8]> = batch.iter().map(|read| read.serial.as_bytes()).collect();
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(&prepared(&client, SUMMARIES_OF).await?, &[&serials])
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
        .collect())
}

/// One statement's failure, for each miss it read: unavailable stays unavailable (the
/// caller may retry elsewhere); anything else is internal.
fn shared(e: &Error) -> Error {
    match e {
        Error::Unavailable(message) => Error::Unavailable(message.clone()),
        Error::Internal(message) => Error::Internal(message.clone()),
        other if other.kind() == ErrorKind::Unavailable => Error::Unavailable(other.to_string()),
        other => Error::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use crate::bench::population;
    use crate::store::Store;

    /// Stores the stand-in certificates of serials 0..300, valid at the time it returns.
    fn with_300_certificates(store: &super::super::PgStore) -> i64 {
        let now_s = 1_800_000_000;
        let certificates = population::StandIns::new(now_s).unwrap();
        let records = population::PublicKeys::from(0)
            .zip(0..300)
            .filter_map(|(key, i)| population::record(i, &certificates, &key));
        assert_eq!(store.danger_bulk_insert_certificates(records).unwrap(), 300);
        now_s
    }

    /// Concurrent misses, of stored and unknown serials, answered through the async path
    /// exactly as the blocking read answers each.
    #[test]
    fn concurrent_misses_are_answered_as_the_blocking_read_answers_them() {
        let Some(store) =
            super::super::testing::fresh_store("summaries::concurrent_misses_are_answered")
        else {
            return;
        };
        with_300_certificates(&store);
        // Stored serials, some asked twice, and serials never issued.
        let serials: Vec<_> = (0..300)
            .chain(0..50)
            .chain(1_000..1_100)
            .map(population::serial)
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let answers = runtime.block_on(async {
            let reads: Vec<_> = serials
                .iter()
                .map(|serial| store.certificate_summary_async(serial).unwrap())
                .collect();
            let mut answers = Vec::new();
            for read in reads {
                answers.push(read.await.unwrap().unwrap());
            }
            answers
        });
        for (serial, answer) in serials.iter().zip(&answers) {
            assert_eq!(
                *answer,
                store.certificate_summary(serial).unwrap(),
                "{serial}"
            );
        }
        assert_eq!(answers.iter().filter(|a| a.is_some()).count(), 350);
    }

    /// Every read of summaries (a miss, a batch of misses and a decision's re-read, the
    /// count by status) is an index-only scan of the primary key that fetches no table row
    /// once the table is vacuumed: what keeps their working set at 100M devices to the
    /// primary key (schema 4). The planner is told not to scan the whole table or use bitmaps,
    /// which it prefers for a table this small.
    #[test]
    fn summaries_are_read_from_the_primary_key_alone() {
        let name = "summaries::summaries_are_read_from_the_primary_key_alone";
        let Some(config) = super::super::testing::fresh_database(name) else {
            return;
        };
        super::super::PgStore::migrate(&config).unwrap();
        let store = super::super::PgStore::connect(&config).unwrap();
        let now_s = with_300_certificates(&store);
        let url = config.url.as_deref().unwrap();
        let password = std::env::var(super::super::testing::PASSWORD_VARIABLE).ok();
        let run = |statements: &[String]| {
            super::super::testing::text_rows(url, password.as_deref(), statements).join("\n")
        };
        run(&["VACUUM certificates".to_string()]);
        let serial = |i| {
            format!(
                "'\\x{}'::bytea",
                hex::encode(population::serial(i).as_bytes())
            )
        };
        let plans = [
            (
                super::SUMMARIES_OF,
                "bytea[]",
                format!("ARRAY[{}, {}, {}]", serial(3), serial(150), serial(299)),
            ),
            (super::SUMMARY_OF, "bytea", serial(7)),
            (
                super::COUNT_BY_STANDING,
                "bigint, integer",
                format!("{now_s}, {}", crate::store::records::SUMMARY_VERSION),
            ),
        ];
        for (statement, types, arguments) in plans {
            let plan = run(&[
                "SET enable_seqscan = off".into(),
                "SET enable_bitmapscan = off".into(),
                format!("PREPARE read ({types}) AS {statement}"),
                format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE read ({arguments})"),
            ]);
            assert!(
                plan.contains("Index Only Scan using certificates_pkey on certificates"),
                "{statement}:\n{plan}"
            );
            assert!(plan.contains("Heap Fetches: 0"), "{statement}:\n{plan}");
        }
    }
}
