//! The tonic services. Authorization already ran in [`super::auth::AuthLayer`]; each handler
//! parses the proto into domain types → calls the RA off the async executor → converts the
//! answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{actor, caller, Caller};
use super::convert::*;
use super::proto;
use crate::attestation::{AttestationFilter, CertificateFactor};
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, DeviceInfo, Serial};
use crate::ra::{
    CertificateQuery, Decision, EnrollRequest, QualifyRequest, Ra, RenewRequest, RenewalProof,
    VerifyRequest,
};
use crate::store::CertificateRecord;

/// Runs blocking RA work (storage sync, signing) on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    // Carry the RPC's span (request id, method) into the worker, so the RA's log lines and
    // errors are tagged with the request they belong to.
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(work)).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => Err(Status::from(Error::internal(format!(
            "worker failed: {join}"
        )))),
    }
}

/// `payra.v1.Registration`.
pub struct RegistrationService {
    pub ra: Arc<Ra>,
}

#[tonic::async_trait]
impl proto::registration_server::Registration for RegistrationService {
    async fn create_enrollment_token(
        &self,
        request: Request<proto::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<proto::CreateEnrollmentTokenResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let customer = CustomerId::parse("customer_id", &request.customer_id)?;
        // Durable through the store's journaled batches; the wait holds no thread.
        let token = self
            .ra
            .create_enrollment_token_async(&actor, customer, request.ttl_s)
            .await?;
        Ok(Response::new(proto::CreateEnrollmentTokenResponse {
            token: token.token,
            expires_at_unix_s: token.expires_at_s,
        }))
    }
}

/// `payra.v1.Enrollment`.
pub struct EnrollmentService {
    pub ra: Arc<Ra>,
}

#[tonic::async_trait]
impl proto::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let actor = actor(&request);
        let peer = request.remote_addr().map(|addr| addr.ip());
        let mut request = EnrollRequest::try_from(request.into_inner())?;
        request.peer = peer;
        // Checked and signed on this task's thread; the wait for the durable write holds no
        // thread.
        let issued = self.ra.enroll(&actor, request).await?;
        Ok(Response::new(issued_response(
            issued,
            &self.ra.attestation_policy(),
        )))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let actor = actor(&request);
        let caller = caller(&request)?;
        let peer = request.remote_addr().map(|addr| addr.ip());
        let request = request.into_inner();
        let (current, proof) = match (caller, request.proof) {
            (Caller::Device(current), None) => (current, None),
            (Caller::Device(_), Some(_)) => {
                return Err(Error::invalid(
                    "proof",
                    "is for devices that cannot present their certificate over TLS (SM2, \
                     or issued by the upstream CA); this caller presented its device \
                     certificate",
                )
                .into())
            }
            (Caller::Anonymous, Some(proof)) => (
                Serial::parse("proof.current_serial", &proof.current_serial)?,
                Some(RenewalProof {
                    signed_at_s: proof.signed_at_unix_s,
                    signature: proof.signature,
                }),
            ),
            (Caller::Anonymous, None) => {
                return Err(Error::Unauthenticated(
                    "Renew needs the device's current certificate over mutual TLS, or for an \
                     SM2 or upstream-issued certificate a RenewalProof signed with its key"
                        .into(),
                )
                .into())
            }
            _ => {
                return Err(
                    Error::PermissionDenied("Renew needs a device certificate".into()).into(),
                )
            }
        };
        let request = RenewRequest {
            current,
            csr_der: request.csr_der,
            device_info: request.device_info.map(DeviceInfo::from),
            proof,
            peer,
        };
        let ra = self.ra.clone();
        let issued = blocking(move || ra.renew(&actor, request)).await?;
        Ok(Response::new(issued_response(
            issued,
            &self.ra.attestation_policy(),
        )))
    }
}

/// VerifyPayment's answer for one decision (also one result of VerifyPayments).
fn verify_payment_response(decision: Decision) -> proto::VerifyPaymentResponse {
    let verdict = verdict_to_proto(decision.verdict);
    let reason = decision.reason.clone();
    let certificate_factor = match decision.certificate_factor {
        None => proto::CertificateFactor::Unspecified,
        Some(CertificateFactor::NotCounted) => proto::CertificateFactor::NotCounted,
        Some(CertificateFactor::Possession) => proto::CertificateFactor::Possession,
        Some(CertificateFactor::Certificate) => proto::CertificateFactor::Certificate,
    } as i32;
    let certificate_factor_reason = decision.certificate_factor_note.clone().unwrap_or_default();
    let (tier, categories, limit, evidence_id) = decision_to_proto(decision);
    proto::VerifyPaymentResponse {
        verdict,
        reason,
        tier,
        categories,
        limit,
        evidence_id,
        certificate_factor,
        certificate_factor_reason,
    }
}

/// `payra.v1.Verification`.
pub struct VerificationService {
    pub ra: Arc<Ra>,
    /// One permit per payment of a VerifyPayments batch being decided
    /// (`limits.max_batched_payments`).
    pub batch_admission: Arc<tokio::sync::Semaphore>,
}

/// What VerifyPayment would have answered with for payment `index` of a batch, as that
/// payment's result: the code and message of its status. Internal details are logged with
/// the payment's index, never sent.
fn payment_error(
    metrics: &crate::metrics::Metrics,
    index: usize,
    error: Error,
) -> proto::PaymentError {
    let answer = match error.kind() {
        crate::error::ErrorKind::Internal => {
            tracing::error!(payment = index, error = %error, "internal error");
            proto::PaymentError {
                code: tonic::Code::Internal as i32,
                message: "internal error; the server log has the details".into(),
            }
        }
        _ => {
            let status = Status::from(error);
            proto::PaymentError {
                code: status.code() as i32,
                message: status.message().to_string(),
            }
        }
    };
    metrics
        .batch_payment_errors
        .with_label_values(&[super::observe::code_name(tonic::Code::from_i32(
            answer.code,
        ))])
        .inc();
    answer
}

#[tonic::async_trait]
impl proto::verification_server::Verification for VerificationService {
    async fn verify_payment(
        &self,
        request: Request<proto::VerifyPaymentRequest>,
    ) -> Result<Response<proto::VerifyPaymentResponse>, Status> {
        let actor = actor(&request);
        let request = VerifyRequest::try_from(request.into_inner())?;
        // Checked and decided on this task (about 60 µs, most of it the signature); only the
        // wait for the decision log's sync is asynchronous.
        let decision: Decision = self
            .ra
            .verify_payment(&actor, request)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(verify_payment_response(decision)))
    }

    async fn verify_payments(
        &self,
        request: Request<proto::VerifyPaymentsRequest>,
    ) -> Result<Response<proto::VerifyPaymentsResponse>, Status> {
        let actor = actor(&request);
        let payments = request.into_inner().payments;
        // Counted before anything is converted: a message of empty entries holds thousands.
        let count = payments.len();
        crate::ra::check_batch_size(count)?;
        // Waits, within the call's deadline, until the batch's payments fit beside those
        // being decided; released when the batch is answered or dropped.
        let _admitted = self
            .batch_admission
            .clone()
            .acquire_many_owned(count as u32)
            .await
            .map_err(|_| Status::unavailable("payra is shutting down"))?;
        let payments = payments.into_iter().map(VerifyRequest::try_from).collect();
        let decided = self
            .ra
            .verify_payments(&actor, payments)
            .await
            .map_err(Status::from)?;
        let results = decided
            .into_iter()
            .enumerate()
            .map(|(index, decided)| proto::VerifyPaymentResult {
                result: Some(match decided {
                    Ok(decision) => proto::verify_payment_result::Result::Decision(
                        verify_payment_response(decision),
                    ),
                    Err(error) => proto::verify_payment_result::Result::Error(payment_error(
                        self.ra.metrics(),
                        index,
                        error,
                    )),
                }),
            })
            .collect();
        Ok(Response::new(proto::VerifyPaymentsResponse { results }))
    }

    async fn qualify_transaction(
        &self,
        request: Request<proto::QualifyTransactionRequest>,
    ) -> Result<Response<proto::QualifyTransactionResponse>, Status> {
        let actor = actor(&request);
        let request = QualifyRequest::try_from(request.into_inner())?;
        let decision = self
            .ra
            .qualify_transaction(&actor, request)
            .await
            .map_err(Status::from)?;
        let (tier, categories, limit, evidence_id) = decision_to_proto(decision);
        Ok(Response::new(proto::QualifyTransactionResponse {
            tier,
            categories,
            limit,
            evidence_id,
        }))
    }

    async fn release_reservation(
        &self,
        request: Request<proto::ReleaseReservationRequest>,
    ) -> Result<Response<proto::ReleaseReservationResponse>, Status> {
        let actor = actor(&request);
        let evidence_id = request.into_inner().evidence_id;
        let ra = self.ra.clone();
        let limit = blocking(move || ra.release_reservation(&actor, &evidence_id)).await?;
        Ok(Response::new(proto::ReleaseReservationResponse {
            limit: Some(limit_to_proto(limit)),
        }))
    }

    async fn get_certificate_status(
        &self,
        request: Request<proto::GetCertificateStatusRequest>,
    ) -> Result<Response<proto::GetCertificateStatusResponse>, Status> {
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let view = self.ra.certificate_status(&serial).await?;
        Ok(Response::new(proto::GetCertificateStatusResponse {
            serial: serial.to_hex(),
            status: status_to_proto(view.status) as i32,
            not_after_unix_s: view.not_after_s,
            revoked_at_unix_s: view.revocation.map_or(0, |r| r.revoked_at_s),
            revocation_reason: view
                .revocation
                .map_or(proto::RevocationReason::Unspecified, |r| {
                    reason_to_proto(r.reason)
                }) as i32,
        }))
    }
}

/// Removes a temporary file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The stream of backup file pieces.
type BackupStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

/// The stream of retention progress reports.
type RetentionStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::RetentionProgress, Status>> + Send>,
>;

/// `payra.v1.Admin`.
pub struct AdminService {
    pub ra: Arc<Ra>,
}

impl AdminService {
    /// A certificate record as the API shows it: its status now, and what its attestation
    /// counts for under the policy in force.
    fn record_response(
        &self,
        record: CertificateRecord,
    ) -> Result<Response<proto::CertificateRecord>, Status> {
        let view = self.ra.status_of(&record);
        let policy = self.ra.attestation_policy();
        Ok(Response::new(record_to_proto(record, &view, &policy)?))
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn get_certificate(
        &self,
        request: Request<proto::GetCertificateRequest>,
    ) -> Result<Response<proto::CertificateRecord>, Status> {
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let ra = self.ra.clone();
        let record = blocking(move || ra.certificate(&serial)).await?;
        self.record_response(record)
    }

    async fn revoke_certificate(
        &self,
        request: Request<proto::RevokeCertificateRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let serial = Serial::parse("serial", &request.serial)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome = blocking(move || ra.revoke_certificate(&actor, &serial, reason)).await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn revoke_device(
        &self,
        request: Request<proto::RevokeDeviceRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let device = DeviceId::parse("device_id", &request.device_id)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome =
            blocking(move || ra.revoke_device(&actor, &device, reason, request.dry_run)).await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn revoke_customer(
        &self,
        request: Request<proto::RevokeCustomerRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let customer = CustomerId::parse("customer_id", &request.customer_id)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome =
            blocking(move || ra.revoke_customer(&actor, &customer, reason, request.dry_run))
                .await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn unhold_certificate(
        &self,
        request: Request<proto::UnholdCertificateRequest>,
    ) -> Result<Response<proto::CertificateRecord>, Status> {
        let actor = actor(&request);
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let ra = self.ra.clone();
        let record = blocking(move || ra.unhold_certificate(&actor, &serial)).await?;
        self.record_response(record)
    }

    async fn set_agreed_limit(
        &self,
        request: Request<proto::SetAgreedLimitRequest>,
    ) -> Result<Response<proto::SetAgreedLimitResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let customer = CustomerId::parse("customer_id", &request.customer_id)?;
        let limit = request.daily_limit_fen;
        let ra = self.ra.clone();
        let stored = customer.clone();
        blocking(move || ra.set_agreed_limit(&actor, &stored, limit)).await?;
        Ok(Response::new(proto::SetAgreedLimitResponse {
            customer_id: customer.to_string(),
            daily_limit_fen: limit,
        }))
    }

    async fn get_limits(
        &self,
        request: Request<proto::GetLimitsRequest>,
    ) -> Result<Response<proto::GetLimitsResponse>, Status> {
        let customer = CustomerId::parse("customer_id", &request.into_inner().customer_id)?;
        let ra = self.ra.clone();
        let name = customer.to_string();
        let (day, has_agreement, statuses) = blocking(move || ra.limits_today(&customer)).await?;
        Ok(Response::new(proto::GetLimitsResponse {
            customer_id: name,
            day,
            has_agreement,
            tiers: statuses.into_iter().map(limit_to_proto).collect(),
        }))
    }

    async fn list_upstream_revocations(
        &self,
        request: Request<proto::ListUpstreamRevocationsRequest>,
    ) -> Result<Response<proto::ListUpstreamRevocationsResponse>, Status> {
        if request.into_inner().retry_now {
            self.ra.sync_upstream().await?;
        }
        let ra = self.ra.clone();
        let pending = blocking(move || match ra.upstream() {
            Some(_) => ra.upstream_backlog(),
            None => Ok(Vec::new()),
        })
        .await?;
        let (crl_url, ocsp_url) = match self.ra.upstream().map(|u| u.status_source()) {
            Some(crate::ca::upstream::StatusSource::Upstream { crl_url, ocsp_url }) => {
                (crl_url.clone(), ocsp_url.clone())
            }
            _ => (None, None),
        };
        Ok(Response::new(proto::ListUpstreamRevocationsResponse {
            upstream: self
                .ra
                .upstream()
                .map(|upstream| upstream.describe())
                .unwrap_or_default(),
            crl_url: crl_url.unwrap_or_default(),
            ocsp_url: ocsp_url.unwrap_or_default(),
            pending: pending
                .into_iter()
                .map(upstream_revocation_to_proto)
                .collect(),
        }))
    }

    async fn get_evidence(
        &self,
        request: Request<proto::GetEvidenceRequest>,
    ) -> Result<Response<proto::Evidence>, Status> {
        let evidence_id = request.into_inner().evidence_id;
        let ra = self.ra.clone();
        let record = blocking(move || ra.evidence(&evidence_id)).await?;
        let engine = &base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        Ok(Response::new(proto::Evidence {
            evidence_id: record.evidence_id,
            intent: engine.decode(&record.intent_b64).unwrap_or_default(),
            signature: engine.decode(&record.signature_b64).unwrap_or_default(),
            certificate_serial: record
                .certificate_serial
                .map(|s| s.to_hex())
                .unwrap_or_default(),
            verdict: record.verdict,
            tier: record.tier.letter().to_string(),
            categories: record
                .categories
                .iter()
                .map(|c| format!("{c:?}").to_lowercase())
                .collect(),
            reserved_fen: record.reserved_fen,
            recorded_at_unix_ms: record.recorded_at_ms,
            customer_id: record
                .customer_id
                .map(|c| c.to_string())
                .unwrap_or_default(),
            day: record.day,
            released: record.released_at_ms.is_some(),
        }))
    }

    async fn issue_client_certificate(
        &self,
        request: Request<proto::IssueClientCertificateRequest>,
    ) -> Result<Response<proto::IssueClientCertificateResponse>, Status> {
        let actor = actor(&request);
        let request = request.into_inner();
        let ra = self.ra.clone();
        let issued = blocking(move || {
            ra.issue_client_certificate(&actor, &request.role, &request.name, &request.csr_der)
        })
        .await?;
        Ok(Response::new(proto::IssueClientCertificateResponse {
            serial: issued.record.serial.to_hex(),
            not_after_unix_s: issued.record.not_after_s,
            certificate_der: issued.certificate_der,
            chain_der: issued.chain_der,
        }))
    }

    async fn create_backup(
        &self,
        request: Request<proto::CreateBackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let actor = actor(&request);
        let ra = self.ra.clone();
        let path = blocking(move || ra.backup_to_file(&actor)).await?;
        // The temporary file goes when the stream ends or the client goes away.
        let cleanup = RemoveOnDrop(path.clone());
        let stream = async_stream::stream! {
            use tokio::io::AsyncReadExt;
            let _cleanup = cleanup;
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(e) => {
                    yield Err(Status::from(Error::internal(format!("backup file: {e}"))));
                    return;
                }
            };
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(n) => yield Ok(proto::BackupChunk { data: buffer[..n].to_vec() }),
                    Err(e) => {
                        yield Err(Status::from(Error::internal(format!("backup file: {e}"))));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn run_retention(
        &self,
        request: Request<proto::RunRetentionRequest>,
    ) -> Result<Response<RetentionStream>, Status> {
        let actor = actor(&request);
        let ra = self.ra.clone();
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Result<proto::RetentionProgress, Status>>(16);
        tokio::task::spawn_blocking(move || {
            let to_proto =
                |p: &crate::ra::RetentionProgress, done: bool| proto::RetentionProgress {
                    nonces_purged: p.nonces as i64,
                    tokens_purged: p.tokens as i64,
                    certificates_purged: p.certificates as i64,
                    ledger_buckets_purged: p.ledger_buckets as i64,
                    releases_purged: p.releases as i64,
                    done,
                };
            let mut report = |p: &crate::ra::RetentionProgress| {
                let _ = tx.blocking_send(Ok(to_proto(p, false)));
            };
            let result = ra.run_retention(&actor, &mut report);
            let last = match result {
                Ok(done) => Ok(to_proto(&done, true)),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.blocking_send(last);
        });
        let stream = async_stream::stream! {
            while let Some(item) = rx.recv().await {
                yield item;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_certificates(
        &self,
        request: Request<proto::ListCertificatesRequest>,
    ) -> Result<Response<proto::ListCertificatesResponse>, Status> {
        let request = request.into_inner();
        let query = CertificateQuery {
            customer: match request.customer_id.as_str() {
                "" => None,
                id => Some(CustomerId::parse("customer_id", id)?),
            },
            device: match request.device_id.as_str() {
                "" => None,
                id => Some(DeviceId::parse("device_id", id)?),
            },
            status: status_from_proto(request.status)?,
            expiring_before_s: match request.expiring_before_unix_s {
                0 => None,
                t => Some(t),
            },
            page_size: usize::try_from(request.page_size)
                .map_err(|_| Error::invalid("page_size", "must not be negative"))?,
            after: match request.page_token.as_str() {
                "" => None,
                token => Some(Serial::parse("page_token", token)?),
            },
            attested_by: match request.attested_by_serial.as_str() {
                "" => None,
                serial
                    if serial.len() <= 64
                        && serial
                            .trim_start_matches('-')
                            .chars()
                            .all(|c| c.is_ascii_hexdigit()) =>
                {
                    Some(crate::attestation::chain::normalise_status_key(serial))
                }
                _ => {
                    return Err(Error::invalid(
                        "attested_by_serial",
                        "must be a serial in hex (at most 64 digits)",
                    )
                    .into())
                }
            },
            attestation: match request.attestation.as_str() {
                "" => None,
                text => Some(AttestationFilter::parse(text).ok_or_else(|| {
                    Error::invalid(
                        "attestation",
                        format!("{text:?} is not one of {}", AttestationFilter::NAMES),
                    )
                })?),
            },
        };
        let ra = self.ra.clone();
        let page = blocking(move || ra.list_certificates(&query)).await?;
        let policy = self.ra.attestation_policy();
        Ok(Response::new(proto::ListCertificatesResponse {
            certificates: page
                .certificates
                .into_iter()
                .map(|(record, view)| record_to_proto(record, &view, &policy))
                .collect::<Result<_, _>>()?,
            next_page_token: page.next.map(|s| s.to_hex()).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's payment gets the code and message VerifyPayment would answer with; an
    /// internal error's details stay in the log; each is counted by code.
    #[test]
    fn a_payments_error_is_verify_payments_status_without_internal_details() {
        let metrics = crate::metrics::Metrics::new();
        let invalid = payment_error(&metrics, 3, Error::invalid("signature", "must be 1 to 72"));
        assert_eq!(invalid.code, tonic::Code::InvalidArgument as i32);
        assert_eq!(invalid.message, "signature: must be 1 to 72");
        let internal = payment_error(
            &metrics,
            4,
            Error::internal("syncing /var/lib/payra/decisions/0000000000000001.log"),
        );
        assert_eq!(internal.code, tonic::Code::Internal as i32);
        assert!(
            !internal.message.contains("/var/lib"),
            "{}",
            internal.message
        );
        let unavailable = payment_error(
            &metrics,
            5,
            Error::Unavailable("payra is shutting down".into()),
        );
        assert_eq!(unavailable.code, tonic::Code::Unavailable as i32);
        assert_eq!(unavailable.message, "payra is shutting down");
        for code in ["INVALID_ARGUMENT", "INTERNAL", "UNAVAILABLE"] {
            assert_eq!(
                metrics
                    .batch_payment_errors
                    .with_label_values(&[code])
                    .get(),
                1,
                "{code}"
            );
        }
    }
}
