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

/// Records an upstream certificate no record holds, to be revoked upstream as
/// cessationOfOperation, with an audit entry; true once it is durable. A failure is logged
/// with the serial (it must then be revoked at the upstream by hand).
fn record_orphan(
    store: &dyn crate::store::Store,
    clock: &dyn crate::clock::Clock,
    serial: &Serial,
    authority_key_id: &[u8],
    why: &str,
) -> bool {
    let entry = UpstreamRevocation {
        serial: serial.clone(),
        revocation: Revocation {
            revoked_at_s: clock.now_s(),
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
        clock.now_ms(),
        &Actor::system(),
        "certificate.orphaned_upstream",
        serial.to_hex(),
        format!("the upstream issued it but {why}; revoking it upstream"),
    );
    tracing::warn!(%serial, why, "an upstream certificate without a record; revoking it upstream");
    match store.put_upstream_revocation(&entry, Some(&audit)) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                %serial,
                error = %e,
                "an upstream certificate without a record could not be queued for revocation; \
                 revoke it at the upstream by hand"
            );
            false
        }
    }
}

/// Tokens and certificates a signing request is being sent upstream for right now, in this
/// process: one token (or one certificate renewing) has one request at a time, so copies of
/// a request sent at once cannot have the upstream issue a certificate each.
#[derive(Default)]
pub(super) struct UpstreamClaims(Arc<std::sync::Mutex<std::collections::HashSet<Vec<u8>>>>);

/// A claim of [`UpstreamClaims`], given back when dropped.
pub(super) struct UpstreamClaim {
    claims: Arc<std::sync::Mutex<std::collections::HashSet<Vec<u8>>>>,
    key: Vec<u8>,
}

impl UpstreamClaims {
    /// Claims `key`; `what` names it in the refusal when another request holds it.
    pub(super) fn claim(&self, key: Vec<u8>, what: &str) -> Result<UpstreamClaim> {
        use crate::sync::Unpoisoned;
        if !self.0.lock().unpoisoned().insert(key.clone()) {
            return Err(Error::FailedPrecondition(format!(
                "{what} is being used by another request right now; wait for its answer"
            )));
        }
        Ok(UpstreamClaim {
            claims: self.0.clone(),
            key,
        })
    }
}

impl Drop for UpstreamClaim {
    fn drop(&mut self) {
        use crate::sync::Unpoisoned;
        self.claims.lock().unpoisoned().remove(&self.key);
    }
}

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
        upstream: &Arc<UpstreamIssuer>,
        public_key: &crate::ca::DevicePublicKey,
        csr_der: &[u8],
        holder: super::signing::Holder,
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
            Err(failure) => failure.outcome,
        };
        self.metrics
            .upstream_requests
            .with_label_values(&["sign", outcome])
            .inc();
        let issued = match answer {
            Ok(issued) => issued,
            Err(failure) => {
                if let Some((serial, authority_key_id)) = &failure.refused {
                    self.orphaned_upstream(serial, authority_key_id, "payra refused it")
                        .await;
                }
                if let Some(late) = failure.late {
                    self.watch_late_answer(upstream, late);
                }
                return Err(failure.error);
            }
        };
        let super::signing::Holder {
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

    /// A signing call past its deadline may still bring a certificate the upstream issued
    /// for an enrollment that has already failed: waited for in the background (at most
    /// [`crate::ca::upstream::LATE_ANSWER_WAIT`]), it is recorded as an orphan and so revoked
    /// upstream. A process killed meanwhile loses the watch: docs/operations.md says how to
    /// find such certificates.
    fn watch_late_answer(
        &self,
        upstream: &Arc<UpstreamIssuer>,
        late: crate::ca::upstream::LateAnswer,
    ) {
        let (upstream, store, clock, wake) = (
            upstream.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.upstream_wake.clone(),
        );
        tokio::spawn(async move {
            let Some((serial, authority_key_id)) = upstream.late_certificate(late).await else {
                return;
            };
            let _ = tokio::task::spawn_blocking(move || {
                if record_orphan(
                    store.as_ref(),
                    clock.as_ref(),
                    &serial,
                    &authority_key_id,
                    "it answered after the deadline",
                ) {
                    wake.notify_one();
                }
            })
            .await;
        });
    }

    /// [`Ra::orphaned_upstream`] for a record that did not commit.
    pub(super) async fn uncommitted_upstream(&self, record: &CertificateRecord) {
        if record.issued_upstream {
            let authority_key_id = record
                .certificate_der()
                .map(|der| authority_key_id(&der))
                .unwrap_or_default();
            self.orphaned_upstream(
                &record.serial,
                &authority_key_id,
                "its enrollment or renewal did not commit",
            )
            .await;
        }
    }

    /// Records an upstream certificate that no record will hold (payra refused it, or its
    /// enrollment or renewal did not commit), so it is revoked upstream; best effort, logged
    /// when it cannot be.
    async fn orphaned_upstream(&self, serial: &Serial, authority_key_id: &[u8], why: &str) {
        let (store, clock, wake) = (
            self.store.clone(),
            self.clock.clone(),
            self.upstream_wake.clone(),
        );
        let (serial, authority_key_id, why) =
            (serial.clone(), authority_key_id.to_vec(), why.to_string());
        // A durable write: off the executor.
        let _ = tokio::task::spawn_blocking(move || {
            if record_orphan(
                store.as_ref(),
                clock.as_ref(),
                &serial,
                &authority_key_id,
                &why,
            ) {
                wake.notify_one();
            }
        })
        .await;
    }

    /// Refuses what the upstream cannot do for a certificate it issued: release a hold (in
    /// either mode: after a switch back to local mode the upstream still holds it).
    pub(super) fn check_upstream_unhold(&self, serial: &Serial) -> Result<()> {
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
                        && !entry.orphan
                        && entry.revocation.reason == revoked.revocation.reason => {}
                Some(mut entry) => {
                    // An orphan entry for a certificate payra holds and has now revoked (its
                    // enrollment committed after all) becomes that revocation.
                    if entry.orphan || entry.revocation.reason != revoked.revocation.reason {
                        entry.revocation = revoked.revocation;
                        entry.confirmed_at_s = None;
                        entry.orphan = false;
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
        // Least recently tried first (never tried before all): an entry the upstream keeps
        // failing on cannot hold up the ones after it.
        pending.sort_by(|a, b| {
            (a.last_attempt_at_s, a.serial.as_bytes())
                .cmp(&(b.last_attempt_at_s, b.serial.as_bytes()))
        });
        Ok(pending)
    }

    /// One pass: sends every pending revocation upstream and records each outcome (a
    /// confirmation with an audit entry). Several replicas may send the same one; revoking
    /// twice upstream is harmless.
    pub async fn sync_upstream(self: &Arc<Self>) -> Result<UpstreamSync> {
        use crate::ca::upstream::UpstreamFailure;
        let Some(upstream) = self.policy.upstream.clone() else {
            return Ok(UpstreamSync::default());
        };
        // One pass at a time in this process (the loop's and an operator's `--retry`).
        let _pass = self.upstream_pass.lock().await;
        let backlog = self.on_store(|ra| ra.upstream_backlog()).await?;
        let mut sync = UpstreamSync::default();
        let total = backlog.len();
        for (done, mut entry) in backlog.into_iter().enumerate() {
            let serial = entry.serial.clone();
            // An orphan whose enrollment committed after all (a store error that was not
            // one) is payra's certificate: it stays valid upstream.
            if entry.orphan
                && self
                    .on_store(move |ra| ra.store.certificate(&serial))
                    .await?
                    .is_some()
            {
                entry.confirmed_at_s = Some(self.clock.now_s());
                entry.last_error =
                    Some("payra holds its record after all; not revoked upstream".into());
                self.on_store(move |ra| ra.store.put_upstream_revocation(&entry, None))
                    .await?;
                continue;
            }
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
                Err(UpstreamFailure::Unreachable(_)) => "unreachable",
                Err(UpstreamFailure::Refused(_)) => "refused",
            };
            self.metrics
                .upstream_requests
                .with_label_values(&["revoke", outcome])
                .inc();
            let unreachable = matches!(answer, Err(UpstreamFailure::Unreachable(_)));
            // The reason now on record, read after the upstream answered: a hold made
            // permanent meanwhile (here or on another replica) is sent again, so a stale
            // reason is never recorded as confirmed.
            let serial = entry.serial.clone();
            let current = match (&answer, entry.orphan) {
                (Ok(()), false) => {
                    self.on_store(move |ra| ra.store.revocation_state(&serial))
                        .await?
                }
                _ => None,
            };
            let audit = match answer {
                Ok(())
                    if current
                        .flatten()
                        .is_some_and(|now| now.reason != entry.revocation.reason) =>
                {
                    let now = current.flatten().unwrap_or(entry.revocation);
                    entry.last_error = Some(format!(
                        "the reason became {} while {} was sent; sending it again",
                        now.reason.cli_name(),
                        entry.revocation.reason.cli_name()
                    ));
                    entry.revocation = now;
                    sync.pending += 1;
                    None
                }
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
                Err(UpstreamFailure::Refused(message))
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
            self.on_store(move |ra| ra.store.put_upstream_revocation(&entry, audit.as_ref()))
                .await?;
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

    /// Runs a store call off the executor.
    async fn on_store<T, F>(self: &Arc<Self>, work: F) -> Result<T>
    where
        F: FnOnce(&Ra) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let ra = self.clone();
        tokio::task::spawn_blocking(move || work(&ra))
            .await
            .map_err(|e| Error::internal(format!("a storage task failed: {e}")))?
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

    /// An RA in RA mode over an in-process upstream, on a fresh development PKI and sled
    /// database in a temporary directory (kept alive by the first value).
    fn upstream_ra() -> (tempfile::TempDir, Arc<LocalUpstream>, Arc<Ra>) {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(LocalUpstream::new(|_| {}));
        let certs = dir.path().join("certs");
        crate::ca::pki::init_dev_pki(&certs, false).unwrap();
        let config = crate::config::Config {
            data_dir: dir.path().join("data"),
            ..crate::config::Config::default()
        };
        let mut policy = super::super::RaPolicy::from_config(&config).unwrap();
        policy.upstream = Some(Arc::new(upstream.issuer(&config.ca.upstream)));
        let ra = Arc::new(
            Ra::new(
                Arc::new(crate::store::SledStore::open(&config.data_dir).unwrap()),
                Arc::new(crate::ca::CaMaterial::load(&certs, None).unwrap()),
                Arc::new(crate::clock::ManualClock::at_system_time()),
                policy,
                Arc::new(crate::metrics::Metrics::new()),
            )
            .unwrap(),
        );
        (dir, upstream, ra)
    }

    /// A fresh enrollment token for `customer`.
    fn token(ra: &Ra, customer: &str) -> String {
        let customer = CustomerId::parse("customer_id", customer).unwrap();
        ra.create_enrollment_token(&Actor::system(), customer, 0)
            .unwrap()
            .token
    }

    /// A device of `customer` enrolled through the upstream: its certificate's serial.
    async fn enrolled(ra: &Arc<Ra>, customer: &str) -> Serial {
        let token = token(ra, customer);
        ra.enroll(&Actor::system(), request(&token, "phone"))
            .await
            .unwrap()
            .record
            .serial
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
        let (_dir, upstream, ra) = upstream_ra();
        let token = token(&ra, "racer");
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

    /// An orphan whose record exists after all (a store error that was not one) is not
    /// revoked upstream: it is payra's certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_payra_holds_a_record_of_is_not_revoked_upstream() {
        let (_dir, upstream, ra) = upstream_ra();
        let actor = Actor::system();
        let serial = enrolled(&ra, "stored").await;
        assert!(record_orphan(
            ra.store.as_ref(),
            ra.clock.as_ref(),
            &serial,
            &[],
            "the store answered with an error"
        ));
        assert_eq!(ra.upstream_backlog().unwrap().len(), 1);
        assert_eq!(ra.sync_upstream().await.unwrap(), UpstreamSync::default());
        assert!(upstream.revoked.lock().unwrap().is_empty());
        assert_eq!(ra.upstream_backlog().unwrap(), vec![]);
        let entry = &ra.store.upstream_revocations().unwrap()[0];
        assert!(entry.confirmed_at_s.is_some());
        assert_eq!(
            entry.last_error.as_deref(),
            Some("payra holds its record after all; not revoked upstream")
        );

        // Revoked later, even for the orphan's own reason, it goes upstream all the same.
        ra.revoke_certificate(&actor, &serial, RevocationReason::CessationOfOperation)
            .unwrap();
        assert_eq!(ra.sync_upstream().await.unwrap().confirmed, 1);
        assert_eq!(
            *upstream.revoked.lock().unwrap(),
            vec![(serial.clone(), RevocationReason::CessationOfOperation)]
        );
        assert_eq!(ra.upstream_backlog().unwrap(), vec![]);
        ra.close_decisions().unwrap();
    }

    /// A hold made permanent while the hold is being sent upstream is not recorded as
    /// confirmed: the reason read after the answer differs, and the next pass sends the new
    /// one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reason_changed_while_it_is_sent_is_sent_again() {
        let (_dir, upstream, ra) = upstream_ra();
        let actor = Actor::system();
        let serial = enrolled(&ra, "racing").await;
        ra.revoke_certificate(&actor, &serial, RevocationReason::CertificateHold)
            .unwrap();
        // Another replica makes it permanent while the upstream is handling the hold.
        let store = ra.store.clone();
        *upstream.on_revoke.lock().unwrap() = Some(Box::new(move |serial: &Serial| {
            let permanent = Revocation {
                revoked_at_s: 1,
                reason: RevocationReason::KeyCompromise,
            };
            let audit = AuditEvent::new(1, &Actor::system(), "test", "", "");
            let _ = store.revoke(std::slice::from_ref(serial), &permanent, &audit);
        }));
        let sync = ra.sync_upstream().await.unwrap();
        assert_eq!(
            sync,
            UpstreamSync {
                confirmed: 0,
                pending: 1
            }
        );
        *upstream.on_revoke.lock().unwrap() = None;
        let backlog = ra.upstream_backlog().unwrap();
        assert_eq!(backlog.len(), 1);
        assert_eq!(
            backlog[0].revocation.reason,
            RevocationReason::KeyCompromise
        );
        assert_eq!(
            ra.sync_upstream().await.unwrap(),
            UpstreamSync {
                confirmed: 1,
                pending: 0
            }
        );
        assert_eq!(
            *upstream.revoked.lock().unwrap(),
            vec![
                (serial.clone(), RevocationReason::CertificateHold),
                (serial, RevocationReason::KeyCompromise)
            ]
        );
        ra.close_decisions().unwrap();
    }

    /// Copies of one enrollment sent at once: one signing request goes upstream, the others
    /// are told the token is in use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_of_one_enrollment_send_one_signing_request() {
        let (_dir, _upstream, ra) = upstream_ra();
        let actor = Actor::system();
        let token = token(&ra, "copies");
        // Hold the token's claim as an enrollment in flight does.
        let held = ra
            .upstream_claims
            .claim(
                crate::store::TokenHash::of(&token).0.to_vec(),
                "this enrollment token",
            )
            .unwrap();
        let refused = ra
            .enroll(&actor, request(&token, "phone"))
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), crate::error::ErrorKind::FailedPrecondition);
        assert!(
            refused
                .to_string()
                .contains("being used by another request"),
            "{refused}"
        );
        drop(held);
        ra.enroll(&actor, request(&token, "phone")).await.unwrap();
        ra.close_decisions().unwrap();
    }

    /// A hold sent upstream and then made permanent is sent again with the new reason; an
    /// upstream that is down leaves the rest of a pass for the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hold_made_permanent_goes_upstream_again_and_an_outage_ends_a_pass() {
        let (_dir, upstream, ra) = upstream_ra();
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
