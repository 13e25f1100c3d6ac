//! Revocation (BRIEF flow 3), release from hold, and the certificate inventory.

use super::status::{CertificateStatus, StatusView};
use super::Ra;
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, RevocationReason, Serial};
use crate::store::{Actor, AuditEvent, CertificateRecord, Revocation};

/// What a revocation call did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    pub serials: Vec<Serial>,
    pub revoked_at_s: i64,
    pub dry_run: bool,
    /// What the call did beyond the request, for the operator.
    pub note: Option<String>,
}

/// Most certificates followed along one lineage (a device renews a few times a day at most;
/// this bounds the walk over a corrupt chain).
const MAX_LINEAGE_STEPS: usize = 10_000;

/// Filters and paging of [`Ra::list_certificates`].
#[derive(Debug, Clone, Default)]
pub struct CertificateQuery {
    pub customer: Option<CustomerId>,
    pub device: Option<DeviceId>,
    pub status: Option<CertificateStatus>,
    pub expiring_before_s: Option<i64>,
    pub page_size: usize,
    pub after: Option<Serial>,
    /// Only certificates whose key's attestation is of this class.
    pub attestation: Option<crate::attestation::AttestationFilter>,
    /// Only certificates whose attestation chain held the certificate of this serial
    /// (as Google's status list writes it): what a later-listed attestation key vouched for.
    pub attested_by: Option<String>,
}

/// One page of certificates, in serial order.
#[derive(Debug, Clone)]
pub struct CertificatePage {
    pub certificates: Vec<(CertificateRecord, StatusView)>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Serial>,
}

/// Default and largest page sizes of ListCertificates.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Most records one ListCertificates call examines without an index, so a call with a
/// rare filter returns a short page (with a page token) instead of scanning everything.
const MAX_SCAN_PER_PAGE: usize = 10_000;

impl Ra {
    /// Revokes one certificate. Unknown serial: `NotFound`. Already revoked:
    /// `FailedPrecondition` naming the original time and reason (nothing changes), except that
    /// a certificate on hold may be revoked for good.
    pub fn revoke_certificate(
        &self,
        actor: &Actor,
        serial: &Serial,
        reason: RevocationReason,
    ) -> Result<RevokeOutcome> {
        if self.store.certificate(serial)?.is_none()
            && self.store.client_certificate(serial)?.is_some()
        {
            let revocation = self.revoke_client(actor, serial, reason)?;
            return Ok(RevokeOutcome {
                serials: vec![serial.clone()],
                revoked_at_s: revocation.revoked_at_s,
                dry_run: false,
                note: None,
            });
        }
        if reason == RevocationReason::KeyCompromise {
            if let Some(outcome) = self.revoke_compromised(actor, serial)? {
                return Ok(outcome);
            }
        }
        self.revoke_batch(actor, vec![serial.clone()], reason, false)
    }

    /// A compromised key endangers every certificate of it, and every later certificate of its
    /// lineage (a renewal may keep the key, and whoever holds the key could have renewed). So
    /// a keyCompromise revocation also revokes, in the same batch, every other live
    /// certificate of the same key, and, when `serial` was already superseded, its live
    /// successors (instead of refusing it as already revoked). `None` when there is nothing
    /// more than `serial` itself to do (the usual path applies).
    fn revoke_compromised(&self, actor: &Actor, serial: &Serial) -> Result<Option<RevokeOutcome>> {
        let Some(record) = self.store.certificate(serial)? else {
            return Ok(None);
        };
        let now_s = self.clock.now_s();
        let changeable = |revocation: Option<crate::store::Revocation>, not_after_s: i64| {
            revocation.is_none_or(|r| r.reason == RevocationReason::CertificateHold)
                && now_s < not_after_s
        };
        let superseded = record.revocation.map(|r| r.reason) == Some(RevocationReason::Superseded);
        let mut targets = Vec::new();
        let mut successors = Vec::new();
        if superseded {
            let mut next = record.superseded_by.clone();
            for _ in 0..MAX_LINEAGE_STEPS {
                let Some(successor) = next.take() else { break };
                let Some(later) = self.store.certificate(&successor)? else {
                    break;
                };
                if changeable(later.revocation, later.not_after_s) {
                    successors.push(successor);
                }
                next = later.superseded_by;
            }
            targets.extend(successors.iter().cloned());
        } else {
            targets.push(serial.clone());
        }
        let mut same_key = Vec::new();
        let key = crate::store::CertificateSummary::of(&record)?.public_key;
        for holder in self.store.certificates_with_key(&key)? {
            if holder.serial != *serial
                && !targets.contains(&holder.serial)
                && changeable(holder.revocation, holder.not_after_s)
            {
                same_key.push(holder.serial);
            }
        }
        targets.extend(same_key.iter().cloned());
        if !superseded && same_key.is_empty() {
            return Ok(None);
        }
        let mut outcome =
            self.revoke_batch(actor, targets, RevocationReason::KeyCompromise, false)?;
        let list = |serials: &[Serial]| {
            serials
                .iter()
                .map(Serial::to_hex)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut notes = Vec::new();
        if superseded {
            notes.push(if successors.is_empty() {
                format!("certificate {serial} was already superseded and has no live successor")
            } else {
                format!(
                    "certificate {serial} was already superseded; its live successor {} of the \
                     same device was revoked for keyCompromise",
                    list(&successors)
                )
            });
        }
        if !same_key.is_empty() {
            notes.push(format!(
                "the same key's other live certificates {} were revoked for keyCompromise too",
                list(&same_key)
            ));
        }
        if outcome.serials.is_empty() {
            notes.push("nothing changed".into());
        }
        notes.extend(outcome.note.take());
        outcome.note = Some(notes.join("; "));
        Ok(Some(outcome))
    }

    /// Revokes every live certificate of `device` (unrevoked or on hold, not expired).
    pub fn revoke_device(
        &self,
        actor: &Actor,
        device: &DeviceId,
        reason: RevocationReason,
        dry_run: bool,
    ) -> Result<RevokeOutcome> {
        let serials = self.store.serials_by_device(device)?;
        if serials.is_empty() {
            return Err(Error::NotFound(format!(
                "no certificates for device {device}"
            )));
        }
        let live = self.live_serials(serials, reason)?;
        self.revoke_batch(actor, live, reason, dry_run)
    }

    /// Revokes every live certificate of `customer`.
    pub fn revoke_customer(
        &self,
        actor: &Actor,
        customer: &CustomerId,
        reason: RevocationReason,
        dry_run: bool,
    ) -> Result<RevokeOutcome> {
        let serials = self.store.serials_by_customer(customer)?;
        if serials.is_empty() {
            return Err(Error::NotFound(format!(
                "no certificates for customer {customer}"
            )));
        }
        let live = self.live_serials(serials, reason)?;
        self.revoke_batch(actor, live, reason, dry_run)
    }

    /// The serials a bulk revocation with `reason` would change.
    fn live_serials(&self, serials: Vec<Serial>, reason: RevocationReason) -> Result<Vec<Serial>> {
        let now_s = self.clock.now_s();
        let mut live = Vec::new();
        for serial in serials {
            let Some(record) = self.store.certificate(&serial)? else {
                continue;
            };
            let changeable = match record.revocation {
                None => true,
                Some(r) => {
                    r.reason == RevocationReason::CertificateHold
                        && reason != RevocationReason::CertificateHold
                }
            };
            if changeable && now_s < record.not_after_s {
                live.push(serial);
            }
        }
        Ok(live)
    }

    pub(super) fn revoke_batch(
        &self,
        actor: &Actor,
        serials: Vec<Serial>,
        reason: RevocationReason,
        dry_run: bool,
    ) -> Result<RevokeOutcome> {
        let revoked_at_s = self.clock.now_s();
        if dry_run || serials.is_empty() {
            return Ok(RevokeOutcome {
                serials,
                revoked_at_s,
                dry_run,
                note: None,
            });
        }
        let revocation = Revocation {
            revoked_at_s,
            reason,
        };
        self.store_revocation(actor, &serials, revocation)?
            .map_err(Error::Revoke)?;
        self.metrics
            .certificates_revoked
            .with_label_values(&[reason.cli_name()])
            .inc_by(serials.len() as u64);
        self.revocations_stored();
        for serial in &serials {
            tracing::info!(serial = %serial, reason = reason.cli_name(), "certificate revoked");
        }
        let mut serials = serials;
        let mut note = None;
        if reason == RevocationReason::KeyCompromise {
            let (late, failed) = self.revoke_late_certificates_of_keys(actor, &serials, revocation);
            let mut notes = Vec::new();
            if !late.is_empty() {
                notes.push(format!(
                    "certificates {} of the same key, stored while it was being revoked, were \
                     revoked for keyCompromise too",
                    late.iter()
                        .map(Serial::to_hex)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            serials.extend(late);
            // The revocation asked for stands; the caller hears what could not be checked.
            if let Some(e) = failed {
                tracing::error!(error = %e, "the second look after a keyCompromise revocation failed");
                let why = match e.kind() {
                    crate::error::ErrorKind::Internal => "an internal error; see the log".into(),
                    _ => e.to_string(),
                };
                notes.push(format!(
                    "the revocation stands, but looking for certificates of the same key stored \
                     meanwhile failed ({why}); revoke the device's certificates for \
                     keyCompromise to be sure"
                ));
            }
            if !notes.is_empty() {
                note = Some(notes.join("; "));
            }
        }
        Ok(RevokeOutcome {
            serials,
            revoked_at_s,
            dry_run,
            note,
        })
    }

    /// Stores `revocation` of `serials` (audited as `actor`'s) and drops them from the
    /// certificate cache whatever the answer: a change that committed but failed its sync,
    /// or one made before ("already revoked"), is visible to readers, and must not stay
    /// cached.
    fn store_revocation(
        &self,
        actor: &Actor,
        serials: &[Serial],
        revocation: Revocation,
    ) -> Result<std::result::Result<(), crate::store::RevokeRejection>> {
        let stored = self.store.revoke(
            serials,
            &revocation,
            &AuditEvent::new(
                self.clock.now_ms(),
                actor,
                "certificate.revoked",
                "",
                revocation.reason.cli_name(),
            ),
        );
        self.cache.invalidate(serials);
        stored
    }

    /// The second look after a keyCompromise revocation: revokes, for the same reason, the
    /// live certificates of the revoked certificates' keys that the revocation did not name.
    /// An enrollment checks the key as it commits, under the lock a revocation takes (the
    /// write turn on sled, the key's transaction lock on PostgreSQL), so one that commits
    /// after the revocation is refused; one that committed before it, after its targets were
    /// listed, is found here. Returns the serials revoked.
    fn revoke_late_certificates_of_keys(
        &self,
        actor: &Actor,
        revoked: &[Serial],
        revocation: Revocation,
    ) -> (Vec<Serial>, Option<Error>) {
        let mut done = Vec::new();
        let failed = self
            .revoke_late_into(actor, revoked, revocation, &mut done)
            .err();
        if !done.is_empty() {
            self.metrics
                .certificates_revoked
                .with_label_values(&[revocation.reason.cli_name()])
                .inc_by(done.len() as u64);
            self.revocations_stored();
        }
        (done, failed)
    }

    /// [`Ra::revoke_late_certificates_of_keys`]'s work: what it revoked goes into `done` as
    /// it goes, so an error part way keeps them.
    fn revoke_late_into(
        &self,
        actor: &Actor,
        revoked: &[Serial],
        revocation: Revocation,
        done: &mut Vec<Serial>,
    ) -> Result<()> {
        let mut keys = Vec::new();
        for serial in revoked {
            if let Some(summary) = self.store.certificate_summary(serial)? {
                if !keys.contains(&summary.public_key) {
                    keys.push(summary.public_key);
                }
            }
        }
        let now_s = self.clock.now_s();
        let mut late = Vec::new();
        for key in &keys {
            for holder in self.store.certificates_with_key(key)? {
                let live = holder
                    .revocation
                    .is_none_or(|r| r.reason == RevocationReason::CertificateHold)
                    && now_s < holder.not_after_s;
                if live && !revoked.contains(&holder.serial) && !late.contains(&holder.serial) {
                    late.push(holder.serial);
                }
            }
        }
        // One at a time: one that somebody else revoked or purged meanwhile is no reason to
        // leave the others live.
        for serial in late {
            match self.store_revocation(actor, std::slice::from_ref(&serial), revocation)? {
                Ok(()) => {
                    tracing::warn!(
                        serial = %serial,
                        "a certificate of a key reported compromised was stored while the key \
                         was being revoked; revoked it too"
                    );
                    done.push(serial);
                }
                Err(rejection) => tracing::info!(
                    serial = %serial,
                    "a certificate of a key reported compromised was changed meanwhile: {}",
                    Error::Revoke(rejection)
                ),
            }
        }
        Ok(())
    }

    /// Releases a certificate from certificateHold: it is good again everywhere.
    pub fn unhold_certificate(&self, actor: &Actor, serial: &Serial) -> Result<CertificateRecord> {
        self.check_upstream_unhold(serial)?;
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "certificate.unheld",
            serial.to_hex(),
            "ok",
        );
        let released = self.store.unhold(serial, &audit);
        self.cache.invalidate(std::slice::from_ref(serial));
        let record = released?.map_err(Error::Revoke)?;
        self.publication.revocation_changed();
        tracing::info!(serial = %serial, "certificate released from hold");
        Ok(record)
    }

    /// Lists certificates matching `query`, in serial order, one page at a time.
    pub fn list_certificates(&self, query: &CertificateQuery) -> Result<CertificatePage> {
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE} allowed"),
                ))
            }
            n => n,
        };
        let now_s = self.clock.now_s();
        let matches = |record: &CertificateRecord, view: &StatusView| {
            query.status.is_none_or(|s| s == view.status)
                && query
                    .expiring_before_s
                    .is_none_or(|t| record.not_after_s < t)
                && query
                    .customer
                    .as_ref()
                    .is_none_or(|c| *c == record.customer_id)
                && query.device.as_ref().is_none_or(|d| *d == record.device_id)
                && query.attested_by.as_ref().is_none_or(|serial| {
                    record
                        .attestation
                        .as_ref()
                        .is_some_and(|a| a.chain_serials.contains(serial))
                })
                && query.attestation.is_none_or(|filter| {
                    filter.matches(record.attestation.as_ref().map_or(
                        crate::attestation::AttestationClass::NONE,
                        crate::attestation::Attestation::class,
                    ))
                })
        };
        let mut certificates = Vec::new();
        let indexed = match (&query.customer, &query.device) {
            (_, Some(device)) => Some(self.store.serials_by_device(device)?),
            (Some(customer), None) => Some(self.store.serials_by_customer(customer)?),
            (None, None) => None,
        };
        if let Some(mut serials) = indexed {
            serials.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let start = query.after.as_ref().map_or(0, |after| {
                serials.partition_point(|s| s.as_bytes() <= after.as_bytes())
            });
            for serial in &serials[start..] {
                let Some(record) = self.store.certificate(serial)? else {
                    continue;
                };
                let view = StatusView::of(&record, now_s);
                if matches(&record, &view) {
                    if certificates.len() == page_size {
                        let next = certificates
                            .last()
                            .map(|(r, _): &(CertificateRecord, StatusView)| r.serial.clone());
                        return Ok(CertificatePage { certificates, next });
                    }
                    certificates.push((record, view));
                }
            }
            return Ok(CertificatePage {
                certificates,
                next: None,
            });
        }
        let mut after = query.after.clone();
        let mut scanned = 0;
        loop {
            let batch = self.store.certificates_after(after.as_ref(), 256)?;
            if batch.is_empty() {
                return Ok(CertificatePage {
                    certificates,
                    next: None,
                });
            }
            for record in batch {
                scanned += 1;
                after = Some(record.serial.clone());
                let view = StatusView::of(&record, now_s);
                if matches(&record, &view) {
                    certificates.push((record, view));
                }
                if certificates.len() == page_size || scanned >= MAX_SCAN_PER_PAGE {
                    return Ok(CertificatePage {
                        certificates,
                        next: after,
                    });
                }
            }
        }
    }
}
