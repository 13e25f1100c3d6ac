//! Retention: deleting what payra no longer needs, in batches, reporting progress.

use super::Ra;
use crate::error::Result;
use crate::store::{Actor, AuditEvent};

/// Records deleted per transaction.
const BATCH: usize = 1000;

/// How far a retention run got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionProgress {
    pub nonces: u64,
    pub tokens: u64,
    pub certificates: u64,
    pub ledger_buckets: u64,
    pub releases: u64,
}

impl Ra {
    /// Purges expired nonces, expired enrollment tokens, (after the configured number of
    /// days) expired certificate records, the stored ledger buckets of days before
    /// yesterday and the stored releases older than two days, calling `progress` after
    /// every batch.
    pub fn run_retention(
        &self,
        actor: &Actor,
        progress: &mut dyn FnMut(&RetentionProgress),
    ) -> Result<RetentionProgress> {
        let mut done = RetentionProgress {
            nonces: self.purge_expired_nonces()? as u64,
            ..RetentionProgress::default()
        };
        progress(&done);
        let now_s = self.clock.now_s();
        loop {
            let audit =
                AuditEvent::new(self.clock.now_ms(), actor, "retention.purged", "tokens", "");
            let purged = self.store.purge_expired_tokens(now_s, BATCH, &audit)?;
            done.tokens += purged as u64;
            progress(&done);
            if purged < BATCH {
                break;
            }
        }
        if self.policy.certificate_retention_s > 0 {
            let before_s = now_s - self.policy.certificate_retention_s;
            loop {
                let audit = AuditEvent::new(
                    self.clock.now_ms(),
                    actor,
                    "retention.purged",
                    "certificates",
                    "",
                );
                let serials = self
                    .store
                    .purge_expired_certificates(before_s, BATCH, &audit)?;
                self.cache.invalidate(&serials);
                done.certificates += serials.len() as u64;
                progress(&done);
                if serials.len() < BATCH {
                    break;
                }
            }
        }
        if done.certificates > 0 {
            self.publication.revocation_changed();
        }
        // Never a day the ledger still holds in memory (a clock that jumped days ahead keeps
        // the two newest days there): its stored buckets are what a restart loads.
        let mut min_day = self.policy.ledger.first_tracked_day(self.clock.now_ms());
        if let Some(oldest) = self.decisions.oldest_day() {
            min_day = min_day.min(oldest);
        }
        self.purge_in_batches(
            actor,
            "ledger",
            &mut done,
            progress,
            |done| &mut done.ledger_buckets,
            |after, audit| {
                self.store
                    .purge_ledger_days_before(&min_day, after, BATCH, audit)
            },
        )?;
        // A release two days old is of a decision from before yesterday at the latest, whose
        // release `release_reservation` refuses by its day: it no longer needs keeping to
        // refuse a repeat. Never one made since the oldest day the ledger still holds,
        // though (a clock days ahead). Memory keeps them all until a restart.
        let mut before_ms = self.clock.now_ms() - 2 * 86_400_000;
        if let Some(start_ms) = self
            .decisions
            .oldest_day()
            .and_then(|day| self.policy.ledger.day_start_ms(&day))
        {
            before_ms = before_ms.min(start_ms);
        }
        self.purge_in_batches(
            actor,
            "releases",
            &mut done,
            progress,
            |done| &mut done.releases,
            |after, audit| {
                self.store
                    .purge_releases_before(before_ms, after, BATCH, audit)
            },
        )?;
        tracing::info!(
            nonces = done.nonces,
            tokens = done.tokens,
            certificates = done.certificates,
            ledger_buckets = done.ledger_buckets,
            releases = done.releases,
            "retention run finished"
        );
        Ok(done)
    }

    /// Calls `purge` batch after batch, each going on after the key where the one before
    /// stopped, until the end; counts into `count` of `done` and reports after every batch.
    fn purge_in_batches(
        &self,
        actor: &Actor,
        target: &str,
        done: &mut RetentionProgress,
        progress: &mut dyn FnMut(&RetentionProgress),
        count: fn(&mut RetentionProgress) -> &mut u64,
        mut purge: impl FnMut(Option<&[u8]>, &AuditEvent) -> Result<(usize, Option<Vec<u8>>)>,
    ) -> Result<()> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let audit = AuditEvent::new(self.clock.now_ms(), actor, "retention.purged", target, "");
            let (purged, next) = purge(after.as_deref(), &audit)?;
            *count(done) += purged as u64;
            progress(done);
            match next {
                Some(key) => after = Some(key),
                None => return Ok(()),
            }
        }
    }
}
