//! Verification cache misses on PostgreSQL ([`Store::certificate_summary_async`]): read on
//! the store's runtime, so no caller's thread waits on the network, and the misses that
//! arrive while earlier ones are being read go together in one statement.
//!
//! [`Store::certificate_summary_async`]: crate::store::Store::certificate_summary_async

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;

use super::{db_error, in_transaction, pool_error, prepared, prepared_tx, Committed};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{RevocationReason, Serial};
use crate::store::records::SUMMARY_VERSION;
use crate::store::{CertificateSummary, Standing, SummaryReceiver};
use deadpool_postgres::Transaction;

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

/// The key of the advisory lock a replica holds while it counts by status ("count" in
/// ASCII).
const COUNT_LOCK: i64 = 0x0063_6f75_6e74;

/// How long a replica waits for another one's count before it takes the count stored
/// before that one (a shutdown waits as long at most).
pub(super) const COUNT_LOCK_WAIT_MS: u32 = 10_000;

/// The count by status at `now_s`, shared by the replicas on this database (schema 5): the
/// count stored in `standing_counts` if it was made less than `reuse_within_s` seconds from
/// `now_s` (either way: a replica's clock may be behind); otherwise a fresh count under the
/// count's advisory lock, stored for the others in the same transaction. A replica that
/// finds another one counting waits for it, up to `lock_wait_ms`, and takes its count; after
/// that it takes the older stored count, or `None` if there is none yet.
pub(super) async fn count_by_standing(
    pool: Pool,
    now_s: i64,
    reuse_within_s: i64,
    lock_wait_ms: u32,
) -> Result<Option<Vec<(Standing, u64)>>> {
    let version = i32::from(SUMMARY_VERSION);
    let window_s = u64::try_from(reuse_within_s).unwrap_or(0);
    let fresh =
        move |counted_at_s: i64| counted_at_s != 0 && now_s.abs_diff(counted_at_s) < window_s;
    in_transaction(&pool, move |tx| {
        Box::pin(async move {
            // A counter whose client has gone quiet does not keep the lock for long.
            tx.batch_execute(&format!(
                "SET LOCAL idle_in_transaction_session_timeout = '60s'; \
                 SET LOCAL lock_timeout = '{lock_wait_ms}ms'"
            ))
            .await
            .map_err(db_error)?;
            let counted_at_s = counted_at(tx).await?;
            if !fresh(counted_at_s) {
                tx.batch_execute("SAVEPOINT count_lock")
                    .await
                    .map_err(db_error)?;
                match tx
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&COUNT_LOCK])
                    .await
                {
                    // Another replica may have counted while this one waited for the lock.
                    Ok(_) if fresh(counted_at(tx).await?) => {}
                    Ok(_) => {
                        let counted = count_and_store(tx, now_s, version).await?;
                        return Ok(Committed::Yes(Some(counted)));
                    }
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                    {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT count_lock")
                            .await
                            .map_err(db_error)?;
                        if counted_at_s == 0 {
                            return Ok(Committed::No(None));
                        }
                    }
                    Err(e) => return Err(db_error(e)),
                }
            }
            let rows = tx
                .query(
                    "SELECT reason, not_yet_valid, expired, count, version FROM standing_counts",
                    &[],
                )
                .await
                .map_err(db_error)?;
            let counts = rows
                .iter()
                .map(standing_count)
                .collect::<Result<Vec<_>>>()?;
            Ok(Committed::Yes(Some(counts)))
        })
    })
    .await
}

/// When the stored count was made (0: never, or its row is gone).
async fn counted_at(tx: &Transaction<'_>) -> Result<i64> {
    Ok(tx
        .query_one(
            "SELECT coalesce((SELECT value FROM counters \
             WHERE name = 'standings_counted_at_s'), 0)",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0))
}

/// Counts by status at `now_s` ([`COUNT_BY_STANDING`], a plain query, so PostgreSQL may run
/// it in parallel) and replaces the stored count with it. A summary of another version is
/// refused before anything is stored.
async fn count_and_store(
    tx: &Transaction<'_>,
    now_s: i64,
    version: i32,
) -> Result<Vec<(Standing, u64)>> {
    let rows = tx
        .query(
            &prepared_tx(tx, COUNT_BY_STANDING).await?,
            &[&now_s, &version],
        )
        .await
        .map_err(db_error)?;
    let counted = rows
        .iter()
        .map(standing_count)
        .collect::<Result<Vec<_>>>()?;
    let reasons: Vec<Option<i32>> = rows.iter().map(|row| row.get(0)).collect();
    let not_yet_valid: Vec<Option<bool>> = rows.iter().map(|row| row.get(1)).collect();
    let expired: Vec<bool> = rows.iter().map(|row| row.get(2)).collect();
    let counts: Vec<i64> = rows.iter().map(|row| row.get(3)).collect();
    let versions: Vec<i32> = rows.iter().map(|row| row.get(4)).collect();
    tx.execute("DELETE FROM standing_counts", &[])
        .await
        .map_err(db_error)?;
    tx.execute(
        "INSERT INTO standing_counts (reason, not_yet_valid, expired, count, version) \
         SELECT * FROM UNNEST($1::integer[], $2::boolean[], $3::boolean[], $4::bigint[], \
         $5::integer[])",
        &[&reasons, &not_yet_valid, &expired, &counts, &versions],
    )
    .await
    .map_err(db_error)?;
    tx.execute(
        "INSERT INTO counters (name, value) VALUES ('standings_counted_at_s', $1) \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&now_s],
    )
    .await
    .map_err(db_error)?;
    Ok(counted)
}

/// One row of [`COUNT_BY_STANDING`] (or of `standing_counts`, which holds them): the
/// standing and its count. A summary of another version cannot be counted.
fn standing_count(row: &tokio_postgres::Row) -> Result<(Standing, u64)> {
    let version: i32 = row.get(4);
    if version != i32::from(SUMMARY_VERSION) {
        return Err(Error::internal(format!(
            "certificate summary of version {version}: this build reads version \
             {SUMMARY_VERSION} only and cannot count it"
        )));
    }
    let code: Option<i32> = row.get(0);
    let revocation = code
        .map(|code| {
            u8::try_from(code)
                .ok()
                .and_then(RevocationReason::from_code)
                .ok_or_else(|| {
                    Error::internal(format!("certificate summary: unknown reason code {code}"))
                })
        })
        .transpose()?;
    let standing = Standing {
        revocation,
        not_yet_valid: row.get(1),
        expired: row.get(2),
    };
    let count: i64 = row.get(3);
    Ok((standing, count.max(0) as u64))
}

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
        with_certificates(store, 0..300)
    }

    /// Stores the stand-in certificates of `serials`, valid at the time it returns.
    fn with_certificates(store: &super::super::PgStore, serials: std::ops::Range<u64>) -> i64 {
        let now_s = 1_800_000_000;
        let certificates = population::StandIns::new(now_s).unwrap();
        let expected = serials.end - serials.start;
        let records = population::PublicKeys::from(serials.start)
            .zip(serials)
            .filter_map(|(key, i)| population::record(i, &certificates, &key));
        assert_eq!(
            store.danger_bulk_insert_certificates(records).unwrap(),
            expected
        );
        now_s
    }

    /// Two replicas on one database count by status once between them: the second takes the
    /// first's stored count while it is younger than its window (seen by certificates added
    /// since, which it does not count), counts afresh once the count is older, or far in the
    /// future (a clock that was wrong), and a window of 0 always counts. While another
    /// process holds the count's lock (is counting), a fresh stored count is taken at once,
    /// and a replica without one waits for the lock, then counts; if the wait runs out it
    /// takes the older stored count, or none. A lost timestamp counts as no count.
    #[test]
    fn replicas_share_the_count_by_status() {
        let name = "summaries::replicas_share_the_count_by_status";
        let Some((first, config)) = super::super::testing::fresh_store_and_config(name) else {
            return;
        };
        let second = super::super::PgStore::connect(&config).unwrap();
        let go_on = std::sync::atomic::AtomicBool::new(false);
        let total = |store: &super::super::PgStore, at_s: i64, window_s: i64| -> u64 {
            let counts = store.count_by_standing(at_s, window_s, &go_on).unwrap();
            counts.unwrap().iter().map(|(_, count)| count).sum()
        };
        // The count's lock, taken or given back on a connection of `first`'s pool.
        let lock = |client: Option<deadpool_postgres::Object>, sql: &'static str| {
            let pool = first.pool.clone();
            first
                .block(async move {
                    let client = match client {
                        Some(client) => client,
                        None => pool.get().await.map_err(super::pool_error)?,
                    };
                    client
                        .execute(sql, &[&super::COUNT_LOCK])
                        .await
                        .map_err(super::db_error)?;
                    Ok(client)
                })
                .unwrap()
        };
        let waiting_for_the_lock = || {
            super::super::testing::on_database(
                &config,
                &[format!(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                     AND database = (SELECT oid FROM pg_database \
                     WHERE datname = current_database()) AND classid = {} AND objid = {}",
                    super::COUNT_LOCK >> 32,
                    super::COUNT_LOCK & 0xffff_ffff
                )],
            ) == ["1"]
        };

        // Waiting briefly for a count that does not end: the count stored before it, or none.
        let impatient = |at_s: i64| {
            second
                .block(super::count_by_standing(second.pool.clone(), at_s, 150, 50))
                .unwrap()
                .map(|counts| counts.iter().map(|(_, count)| count).sum::<u64>())
        };

        let now_s = with_300_certificates(&first);
        let held = lock(None, "SELECT pg_advisory_lock($1)");
        assert_eq!(impatient(now_s), None, "nothing stored yet");
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| total(&second, now_s, 150));
            // Bounded: a waiter that never queues for the lock fails here, not by hanging.
            let mut polls = 0;
            while !waiting_for_the_lock() {
                assert!(
                    !waiter.is_finished(),
                    "counted without waiting for the lock"
                );
                polls += 1;
                assert!(polls < 3_000, "the count never waited for the lock");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            drop(lock(Some(held), "SELECT pg_advisory_unlock($1)"));
            assert_eq!(
                waiter.join().unwrap(),
                300,
                "counted once the lock was free"
            );
        });
        with_certificates(&first, 300..310);
        assert_eq!(
            total(&first, now_s + 149, 150),
            300,
            "taken from the second"
        );
        assert_eq!(total(&first, now_s + 150, 150), 310, "counted again");
        with_certificates(&first, 310..315);
        assert_eq!(
            total(&second, now_s + 200, 150),
            310,
            "taken from the first"
        );
        assert_eq!(total(&second, now_s + 200, 0), 315, "a window of 0 counts");
        with_certificates(&first, 315..320);
        assert_eq!(total(&first, now_s, 150), 320, "stored 200 s in its future");
        with_certificates(&first, 320..325);
        let held = lock(None, "SELECT pg_advisory_lock($1)");
        assert_eq!(
            total(&second, now_s + 100, 150),
            320,
            "a fresh count is taken while another replica counts"
        );
        assert_eq!(
            impatient(now_s + 1_000),
            Some(320),
            "an older count is taken after the wait"
        );
        drop(lock(Some(held), "SELECT pg_advisory_unlock($1)"));
        // A lost timestamp row is a count never made: counted afresh, and the row is back.
        let forget = "DELETE FROM counters WHERE name = 'standings_counted_at_s'";
        super::super::testing::on_database(&config, &[forget.to_string()]);
        assert_eq!(total(&second, now_s + 100, 150), 325, "no timestamp");
        with_certificates(&first, 325..330);
        assert_eq!(
            total(&first, now_s + 101, 150),
            325,
            "its timestamp is back"
        );
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
        let Some((store, config)) = super::super::testing::fresh_store_and_config(name) else {
            return;
        };
        let now_s = with_300_certificates(&store);
        let run = |statements: &[String]| {
            super::super::testing::on_database(&config, statements).join("\n")
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
