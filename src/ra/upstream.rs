//! RA mode: device certificates signed by an upstream CA, and payra's revocations brought to
//! it.
//!
//! A revocation is payra's first: it commits in payra's store and is effective in the next
//! verification, as in local mode. Bringing it upstream follows: the revoked index is the
//! outbox (a revocation and its outbox entry are one write), and [`Ra::sync_upstream`] sends
//! whatever the upstream has not confirmed, recording each attempt, until it has. An
//! enrollment that got an upstream certificate but could not store it leaves an orphan entry,
//! revoked upstream the same way.

use std::collections::HashMap;
use std::sync::Arc;

use super::Ra;
use crate::ca::upstream::{authority_key_id, RevocationRequest, UpstreamIssuer};
use crate::error::{Error, Result};
use crate::model::{RevocationReason, Serial};
use crate::store::{Actor, AuditEvent, CertificateRecord, Revocation, UpstreamRevocation};

/// What one pass of [`Ra::sync_upstream`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamSync {
    /// Revocations the upstream confirmed in this pass.
    pub confirmed: usize,
    /// Revocations still pending after it.
    pub pending: usize,
}

impl Ra {
    /// The upstream CA, in RA mode.
    pub fn upstream(&self) -> Option<&Arc<UpstreamIssuer>> {
        self.policy.upstream.as_ref()
    }

    /// Has the upstream sign a device certificate for `public_key` (the CSR `csr_der`) and
    /// builds its record, marked `issued_upstream` (not yet stored). The wait is bounded by
    /// `ca.upstream.timeout_ms`; a certificate payra refuses is left to be revoked upstream.
    pub(super) async fn sign_upstream(
        &self,
        upstream: &UpstreamIssuer,
        public_key: &crate::ca::DevicePublicKey,
        csr_der: &[u8],
        holder: super::enrollment::Holder,
        renewed_from: Option<Serial>,
        now_s: i64,
    ) -> Result<(CertificateRecord, Vec<u8>)> {
        let answer = upstream
            .issue(
                &self.policy.profile,
                public_key,
                csr_der,
                &holder.subscriber,
                now_s,
            )
            .await;
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(failure) if failure.refused.is_some() => "mismatch",
            Err(_) => "unreachable",
        };
        self.metrics
            .upstream_requests
            .with_label_values(&["sign", outcome])
            .inc();
        let issued = match answer {
            Ok(issued) => issued,
            Err(failure) => {
                if let Some((serial, authority_key_id)) = &failure.refused {
                    self.orphaned_upstream(serial, authority_key_id, "payra refused it");
                }
                return Err(failure.error);
            }
        };
        let super::enrollment::Holder {
            customer,
            device,
            device_info,
            subscriber,
        } = holder;
        let mut record = self.device_record(
            issued.serial,
            public_key,
            (customer, device, device_info, subscriber),
            &issued.certificate,
            renewed_from,
            now_s,
        );
        record.issued_upstream = true;
        Ok((record, issued.certificate.der))
    }

    /// [`Ra::orphaned_upstream`] for a record that did not commit.
    pub(super) fn uncommitted_upstream(&self, record: &CertificateRecord) {
        if record.issued_upstream {
            let authority_key_id = record
                .certificate_der()
                .map(|der| authority_key_id(&der))
                .unwrap_or_default();
            self.orphaned_upstream(
                &record.serial,
                &authority_key_id,
                "its enrollment or renewal did not commit",
            );
        }
    }

    /// Records an upstream certificate that no record will hold (payra refused it, or its
    /// enrollment or renewal did not commit), so it is revoked upstream; best effort, logged
    /// when it cannot be.
    fn orphaned_upstream(&self, serial: &Serial, authority_key_id: &[u8], why: &str) {
        let entry = UpstreamRevocation {
            serial: serial.clone(),
            revocation: Revocation {
                revoked_at_s: self.clock.now_s(),
                reason: RevocationReason::CessationOfOperation,
            },
            authority_key_id_hex: hex::encode(authority_key_id),
            confirmed_at_s: None,
            attempts: 0,
            last_attempt_at_s: None,
            last_error: None,
            orphan: true,
        };
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            &Actor::system(),
            "certificate.orphaned_upstream",
            serial.to_hex(),
            format!("the upstream issued it but {why}; revoking it upstream"),
        );
        tracing::warn!(%serial, why, "an upstream certificate without a record; revoking it upstream");
        match self.store.put_upstream_revocation(&entry, Some(&audit)) {
            Ok(()) => self.upstream_wake.notify_one(),
            Err(e) => tracing::error!(
                %serial,
                error = %e,
                "an upstream certificate without a record could not be queued for revocation; \
                 revoke it at the upstream by hand"
            ),
        }
    }

    /// Refuses what the upstream cannot do for a certificate it issued: release a hold.
    pub(super) fn check_upstream_unhold(&self, serial: &Serial) -> Result<()> {
        if self.policy.upstream.is_none() {
            return Ok(());
        }
        if let Some(record) = self.store.certificate(serial)? {
            if record.issued_upstream {
                return Err(Error::FailedPrecondition(format!(
                    "certificate {serial} was issued by the upstream CA, which cannot release a \
                     hold; revoke it for good and enroll the device again"
                )));
            }
        }
        Ok(())
    }

    /// Wakes the upstream sync after a revocation this process stored.
    pub(super) fn revocations_stored(&self) {
        self.publication.revocation_changed();
        if self.policy.upstream.is_some() {
            self.upstream_wake.notify_one();
        }
    }

    /// Every revocation the upstream has not confirmed: revoked upstream certificates whose
    /// entry is missing, unconfirmed or for another reason (a hold made permanent), and
    /// orphans not yet confirmed. With the attempts made so far.
    pub fn upstream_backlog(&self) -> Result<Vec<UpstreamRevocation>> {
        let mut known: HashMap<Serial, UpstreamRevocation> = self
            .store
            .upstream_revocations()?
            .into_iter()
            .map(|entry| (entry.serial.clone(), entry))
            .collect();
        let mut pending = Vec::new();
        for revoked in self.store.revoked_entries()? {
            if !revoked.issued_upstream {
                continue;
            }
            match known.remove(&revoked.serial) {
                Some(entry)
                    if entry.confirmed_at_s.is_some()
                        && entry.revocation.reason == revoked.revocation.reason => {}
                Some(mut entry) => {
                    if entry.revocation.reason != revoked.revocation.reason {
                        entry.revocation = revoked.revocation;
                        entry.confirmed_at_s = None;
                    }
                    pending.push(entry);
                }
                None => {
                    let authority_key_id_hex = match self.store.certificate(&revoked.serial)? {
                        Some(record) => hex::encode(authority_key_id(&record.certificate_der()?)),
                        None => String::new(),
                    };
                    pending.push(UpstreamRevocation {
                        serial: revoked.serial,
                        revocation: revoked.revocation,
                        authority_key_id_hex,
                        confirmed_at_s: None,
                        attempts: 0,
                        last_attempt_at_s: None,
                        last_error: None,
                        orphan: false,
                    });
                }
            }
        }
        pending.extend(
            known
                .into_values()
                .filter(|entry| entry.orphan && entry.confirmed_at_s.is_none()),
        );
        pending.sort_by(|a, b| a.serial.as_bytes().cmp(b.serial.as_bytes()));
        Ok(pending)
    }

    /// One pass: sends every pending revocation upstream and records each outcome (a
    /// confirmation with an audit entry). Several replicas may send the same one; revoking
    /// twice upstream is harmless.
    pub async fn sync_upstream(self: &Arc<Self>) -> Result<UpstreamSync> {
        let Some(upstream) = self.policy.upstream.clone() else {
            return Ok(UpstreamSync::default());
        };
        let ra = self.clone();
        let backlog = tokio::task::spawn_blocking(move || ra.upstream_backlog())
            .await
            .map_err(|e| Error::internal(format!("reading the upstream backlog: {e}")))??;
        let mut sync = UpstreamSync::default();
        let total = backlog.len();
        for (done, mut entry) in backlog.into_iter().enumerate() {
            let request = RevocationRequest {
                serial: entry.serial.clone(),
                authority_key_id: hex::decode(&entry.authority_key_id_hex).unwrap_or_default(),
                reason: entry.revocation.reason,
            };
            let answer = upstream.revoke(&request).await;
            let now_ms = self.clock.now_ms();
            entry.attempts = entry.attempts.saturating_add(1);
            entry.last_attempt_at_s = Some(now_ms.div_euclid(1000));
            let outcome = match &answer {
                Ok(()) => "ok",
                Err(crate::ca::upstream::UpstreamFailure::Unreachable(_)) => "unreachable",
                Err(crate::ca::upstream::UpstreamFailure::Refused(_)) => "refused",
            };
            self.metrics
                .upstream_requests
                .with_label_values(&["revoke", outcome])
                .inc();
            let unreachable = matches!(
                answer,
                Err(crate::ca::upstream::UpstreamFailure::Unreachable(_))
            );
            let audit = match answer {
                Ok(()) => {
                    entry.confirmed_at_s = Some(now_ms.div_euclid(1000));
                    entry.last_error = None;
                    sync.confirmed += 1;
                    Some(AuditEvent::new(
                        now_ms,
                        &Actor::system(),
                        "certificate.revocation_confirmed_upstream",
                        entry.serial.to_hex(),
                        format!(
                            "{} confirmed by {} after {} attempt(s)",
                            entry.revocation.reason.cli_name(),
                            upstream.describe(),
                            entry.attempts
                        ),
                    ))
                }
                // An orphan the upstream has no record of needs no revocation there.
                Err(crate::ca::upstream::UpstreamFailure::Refused(message))
                    if entry.orphan && message.ends_with("[not found]") =>
                {
                    entry.confirmed_at_s = Some(now_ms.div_euclid(1000));
                    entry.last_error = Some(message);
                    sync.confirmed += 1;
                    None
                }
                Err(failure) => {
                    tracing::warn!(
                        serial = %entry.serial,
                        attempts = entry.attempts,
                        %failure,
                        "the upstream CA has not confirmed a revocation yet; retrying later"
                    );
                    entry.last_error = Some(failure.to_string());
                    sync.pending += 1;
                    None
                }
            };
            let ra = self.clone();
            tokio::task::spawn_blocking(move || {
                ra.store.put_upstream_revocation(&entry, audit.as_ref())
            })
            .await
            .map_err(|e| Error::internal(format!("recording an upstream revocation: {e}")))??;
            if unreachable {
                // An upstream that is down would make every remaining request wait out its
                // deadline in turn: they wait for the next pass.
                sync.pending += total - done - 1;
                break;
            }
        }
        self.metrics
            .upstream_revocations_pending
            .set(i64::try_from(sync.pending).unwrap_or(i64::MAX));
        Ok(sync)
    }

    /// Waits for the next revocation this process stores, or `interval`, whichever is first.
    pub async fn upstream_sync_due(&self, interval: std::time::Duration) {
        let _ = tokio::time::timeout(interval, self.upstream_wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::upstream::tests::LocalUpstream;
    use crate::model::{CustomerId, DeviceId, DeviceInfo};
    use crate::ra::EnrollRequest;

    /// An RA in RA mode over `upstream`, on a fresh development PKI and sled database.
    fn upstream_ra(dir: &std::path::Path, upstream: &Arc<LocalUpstream>) -> Arc<Ra> {
        let certs = dir.join("certs");
        crate::ca::pki::init_dev_pki(&certs, false).unwrap();
        let config = crate::config::Config {
            data_dir: dir.join("data"),
            ..crate::config::Config::default()
        };
        let mut policy = super::super::RaPolicy::from_config(&config).unwrap();
        policy.upstream = Some(Arc::new(upstream.issuer(&config.ca.upstream)));
        Arc::new(
            Ra::new(
                Arc::new(crate::store::SledStore::open(&config.data_dir).unwrap()),
                Arc::new(crate::ca::CaMaterial::load(&certs, None).unwrap()),
                Arc::new(crate::clock::ManualClock::at_system_time()),
                policy,
                Arc::new(crate::metrics::Metrics::new()),
            )
            .unwrap(),
        )
    }

    fn request(token: &str, device: &str) -> EnrollRequest {
        EnrollRequest {
            peer: None,
            token: token.to_string(),
            csr_der: crate::client::DeviceKey::generate()
                .csr_der(device)
                .unwrap(),
            device_id: DeviceId::parse("device_id", device).unwrap(),
            device_info: DeviceInfo::default(),
            attestation: None,
        }
    }

    /// Two enrollments with one token both get past the token check and both get an
    /// upstream certificate; the store lets one commit. The other's certificate has no
    /// record, and is revoked upstream as cessationOfOperation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_losing_certificate_of_a_token_race_is_revoked_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(LocalUpstream::new(|_| {}));
        let ra = upstream_ra(dir.path(), &upstream);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "racer").unwrap();
        let token = ra
            .create_enrollment_token(&actor, customer, 0)
            .unwrap()
            .token;
        let (first, second) = {
            let (ra1, ra2) = (ra.clone(), ra.clone());
            let (r1, r2) = (request(&token, "phone-a"), request(&token, "phone-b"));
            let a =
                tokio::task::spawn_blocking(move || ra1.prepare_enrollment(&Actor::system(), r1));
            let b =
                tokio::task::spawn_blocking(move || ra2.prepare_enrollment(&Actor::system(), r2));
            (a.await.unwrap().unwrap(), b.await.unwrap().unwrap())
        };
        let loser_serial = second.record.serial.clone();
        let winner = ra.commit_enrollment(first).await.unwrap();
        assert!(winner.record.issued_upstream);
        assert_eq!(winner.chain_der, vec![upstream.issuer_der.clone()]);
        let lost = ra.commit_enrollment(second).await.unwrap_err();
        assert!(matches!(lost, Error::Token(_)), "{lost:?}");
        assert_eq!(ra.store.certificate(&loser_serial).unwrap(), None);

        let backlog = ra.upstream_backlog().unwrap();
        assert_eq!(backlog.len(), 1);
        assert!(backlog[0].orphan);
        assert_eq!(backlog[0].serial, loser_serial);
        let sync = ra.sync_upstream().await.unwrap();
        assert_eq!(
            sync,
            UpstreamSync {
                confirmed: 1,
                pending: 0
            }
        );
        assert_eq!(
            *upstream.revoked.lock().unwrap(),
            vec![(loser_serial, RevocationReason::CessationOfOperation)]
        );
        assert_eq!(ra.upstream_backlog().unwrap(), vec![]);
        ra.close_decisions().unwrap();
    }

    /// A hold sent upstream and then made permanent is sent again with the new reason; an
    /// upstream that is down leaves the rest of a pass for the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_made_permanent_goes_upstream_again_and_an_outage_ends_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(LocalUpstream::new(|_| {}));
        let ra = upstream_ra(dir.path(), &upstream);
        let actor = Actor::system();
        let customer = CustomerId::parse("customer_id", "holder").unwrap();
        let mut serials = Vec::new();
        for device in ["phone-a", "phone-b", "phone-c"] {
            let token = ra
                .create_enrollment_token(&actor, customer.clone(), 0)
                .unwrap()
                .token;
            serials.push(
                ra.enroll(&actor, request(&token, device))
                    .await
                    .unwrap()
                    .record
                    .serial,
            );
        }
        ra.revoke_certificate(&actor, &serials[0], RevocationReason::CertificateHold)
            .unwrap();
        assert_eq!(ra.sync_upstream().await.unwrap().confirmed, 1);
        ra.revoke_certificate(&actor, &serials[0], RevocationReason::KeyCompromise)
            .unwrap();
        for serial in &serials[1..] {
            ra.revoke_certificate(&actor, serial, RevocationReason::AffiliationChanged)
                .unwrap();
        }
        upstream
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let sync = ra.sync_upstream().await.unwrap();
        assert_eq!(
            sync,
            UpstreamSync {
                confirmed: 0,
                pending: 3
            }
        );
        let backlog = ra.upstream_backlog().unwrap();
        // One attempt failed and ended the pass; the others wait untried.
        let failed: Vec<_> = backlog
            .iter()
            .filter(|entry| entry.last_error.is_some())
            .collect();
        assert_eq!(failed.len(), 1, "{backlog:?}");
        assert_eq!(failed[0].last_error.as_deref(), Some("connection refused"));

        upstream
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            ra.sync_upstream().await.unwrap(),
            UpstreamSync {
                confirmed: 3,
                pending: 0
            }
        );
        let revoked = upstream.revoked.lock().unwrap().clone();
        assert_eq!(
            revoked[0],
            (serials[0].clone(), RevocationReason::CertificateHold)
        );
        assert!(revoked.contains(&(serials[0].clone(), RevocationReason::KeyCompromise)));
        assert_eq!(revoked.len(), 4);
        let unhold = ra.unhold_certificate(&actor, &serials[0]).unwrap_err();
        assert_eq!(unhold.kind(), crate::error::ErrorKind::FailedPrecondition);
        ra.close_decisions().unwrap();
    }
}
