//! The tonic services. Authorization already ran in [`super::auth::AuthLayer`]; each handler
//! parses the proto into domain types → calls the RA off the async executor → converts the
//! answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{actor, caller, Caller};
use super::proto;
use crate::attestation::{
    Attestation, AttestationFilter, AttestationPolicy, CertificateFactor, Evidence,
};
use crate::error::{Error, Result};
use crate::model::{
    CustomerId, DeviceId, DeviceInfo, Factor, FactorCategory, RevocationReason, Scene, Serial, Tier,
};
use crate::ra::{
    CertificateQuery, CertificateStatus, Decision, EnrollRequest, LimitStatus, PaymentIntent,
    QualifyRequest, Ra, RenewRequest, RevokeOutcome, StatusView, Transaction, Verdict,
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

impl From<proto::DeviceInfo> for DeviceInfo {
    fn from(info: proto::DeviceInfo) -> DeviceInfo {
        DeviceInfo {
            platform: info.platform,
            model: info.model,
            os_version: info.os_version,
            app_version: info.app_version,
        }
    }
}

impl From<DeviceInfo> for proto::DeviceInfo {
    fn from(info: DeviceInfo) -> proto::DeviceInfo {
        proto::DeviceInfo {
            platform: info.platform,
            model: info.model,
            os_version: info.os_version,
            app_version: info.app_version,
        }
    }
}

impl TryFrom<proto::EnrollRequest> for EnrollRequest {
    type Error = Error;
    fn try_from(request: proto::EnrollRequest) -> Result<EnrollRequest> {
        Ok(EnrollRequest {
            peer: None,
            token: request.token,
            csr_der: request.csr_der,
            device_id: DeviceId::parse("device_id", &request.device_id)?,
            device_info: request
                .device_info
                .map(DeviceInfo::from)
                .unwrap_or_default(),
            attestation: request.attestation.map(|evidence| match evidence {
                proto::enroll_request::Attestation::Android(android) => Evidence::Android {
                    chain: android.certificate_chain_der,
                },
                proto::enroll_request::Attestation::Apple(apple) => Evidence::Apple {
                    attestation_object: apple.attestation_object,
                },
            }),
        })
    }
}

/// An attestation as the API shows it, with what it counts for under `policy`.
fn attestation_to_proto(
    attestation: &Attestation,
    policy: &AttestationPolicy,
) -> proto::DeviceAttestation {
    let (factor, note) = policy.factor(attestation.class());
    proto::DeviceAttestation {
        platform: attestation.platform.name().to_string(),
        security_level: attestation.security_level.name().to_string(),
        boot_state: attestation
            .boot_state
            .map(|b| b.name().to_string())
            .unwrap_or_default(),
        device_locked: attestation.device_locked.unwrap_or(false),
        root: attestation.root.clone(),
        root_key_sha256: attestation.root_key_sha256.clone(),
        apps: attestation.apps.clone(),
        attested_at_unix_s: attestation.attested_at_s,
        tier_a_eligible: factor == CertificateFactor::Certificate,
        policy_note: note.unwrap_or_default(),
        chain_serials: attestation.chain_serials.clone(),
    }
}

fn reason_to_proto(reason: RevocationReason) -> proto::RevocationReason {
    use proto::RevocationReason as P;
    match reason {
        RevocationReason::Unspecified => P::Unspecified,
        RevocationReason::KeyCompromise => P::KeyCompromise,
        RevocationReason::AffiliationChanged => P::AffiliationChanged,
        RevocationReason::Superseded => P::Superseded,
        RevocationReason::CessationOfOperation => P::CessationOfOperation,
        RevocationReason::CertificateHold => P::CertificateHold,
        RevocationReason::PrivilegeWithdrawn => P::PrivilegeWithdrawn,
    }
}

fn reason_from_proto(value: i32) -> Result<RevocationReason> {
    use proto::RevocationReason as P;
    match P::try_from(value) {
        Ok(P::Unspecified) => Ok(RevocationReason::Unspecified),
        Ok(P::KeyCompromise) => Ok(RevocationReason::KeyCompromise),
        Ok(P::AffiliationChanged) => Ok(RevocationReason::AffiliationChanged),
        Ok(P::Superseded) => Ok(RevocationReason::Superseded),
        Ok(P::CessationOfOperation) => Ok(RevocationReason::CessationOfOperation),
        Ok(P::CertificateHold) => Ok(RevocationReason::CertificateHold),
        Ok(P::PrivilegeWithdrawn) => Ok(RevocationReason::PrivilegeWithdrawn),
        Err(_) => Err(Error::invalid(
            "reason",
            format!("{value} is not a revocation reason payra accepts"),
        )),
    }
}

fn status_from_proto(value: i32) -> Result<Option<CertificateStatus>> {
    use proto::CertificateStatus as P;
    Ok(match P::try_from(value) {
        Ok(P::Unspecified) => None,
        Ok(P::Valid) => Some(CertificateStatus::Valid),
        Ok(P::Revoked) => Some(CertificateStatus::Revoked),
        Ok(P::Expired) => Some(CertificateStatus::Expired),
        Ok(P::Superseded) => Some(CertificateStatus::Superseded),
        Ok(P::OnHold) => Some(CertificateStatus::OnHold),
        Ok(P::NotYetValid) => Some(CertificateStatus::NotYetValid),
        Err(_) => return Err(Error::invalid("status", format!("{value} is not a status"))),
    })
}

fn revoke_response(outcome: RevokeOutcome) -> proto::RevokeResponse {
    proto::RevokeResponse {
        revoked_serials: outcome.serials.iter().map(Serial::to_hex).collect(),
        revoked_at_unix_s: outcome.revoked_at_s,
        dry_run: outcome.dry_run,
        note: outcome.note.unwrap_or_default(),
    }
}

fn issued_response(issued: crate::ra::Issued, policy: &AttestationPolicy) -> proto::EnrollResponse {
    proto::EnrollResponse {
        attestation: issued
            .record
            .attestation
            .as_ref()
            .map(|a| attestation_to_proto(a, policy)),
        certificate_der: issued.certificate_der,
        chain_der: issued.chain_der,
        serial: issued.record.serial.to_hex(),
        not_before_unix_s: issued.record.not_before_s,
        not_after_unix_s: issued.record.not_after_s,
        customer_id: issued.record.customer_id.to_string(),
        device_id: issued.record.device_id.to_string(),
        subscriber_ref: issued.record.subscriber_ref.unwrap_or_default(),
    }
}

fn status_to_proto(status: CertificateStatus) -> proto::CertificateStatus {
    use proto::CertificateStatus as P;
    match status {
        CertificateStatus::Valid => P::Valid,
        CertificateStatus::NotYetValid => P::NotYetValid,
        CertificateStatus::Expired => P::Expired,
        CertificateStatus::Revoked => P::Revoked,
        CertificateStatus::Superseded => P::Superseded,
        CertificateStatus::OnHold => P::OnHold,
    }
}

fn record_to_proto(
    record: CertificateRecord,
    view: &StatusView,
    policy: &AttestationPolicy,
) -> Result<proto::CertificateRecord, Status> {
    let certificate_der = record.certificate_der().map_err(Status::from)?;
    Ok(proto::CertificateRecord {
        attestation: record
            .attestation
            .as_ref()
            .map(|a| attestation_to_proto(a, policy)),
        serial: record.serial.to_hex(),
        customer_id: record.customer_id.to_string(),
        device_id: record.device_id.to_string(),
        subject: record.subject,
        not_before_unix_s: record.not_before_s,
        not_after_unix_s: record.not_after_s,
        issued_at_unix_s: record.issued_at_s,
        status: status_to_proto(view.status) as i32,
        revoked_at_unix_s: record.revocation.map_or(0, |r| r.revoked_at_s),
        revocation_reason: record
            .revocation
            .map_or(proto::RevocationReason::Unspecified, |r| {
                reason_to_proto(r.reason)
            }) as i32,
        device_info: Some(record.device_info.into()),
        certificate_der,
        renewed_from_serial: record.renewed_from.map(|s| s.to_hex()).unwrap_or_default(),
        superseded_by_serial: record.superseded_by.map(|s| s.to_hex()).unwrap_or_default(),
        subscriber_ref: record.subscriber_ref.unwrap_or_default(),
    })
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
        let Caller::Device(current) = caller(&request)? else {
            return Err(Error::PermissionDenied("Renew needs a device certificate".into()).into());
        };
        let request = request.into_inner();
        let request = RenewRequest {
            current,
            csr_der: request.csr_der,
            device_info: request.device_info.map(DeviceInfo::from),
        };
        let ra = self.ra.clone();
        let issued = blocking(move || ra.renew(&actor, request)).await?;
        Ok(Response::new(issued_response(
            issued,
            &self.ra.attestation_policy(),
        )))
    }
}

fn scene_from_proto(value: i32) -> Option<Scene> {
    use proto::Scene as P;
    match P::try_from(value) {
        Ok(P::InApp) => Some(Scene::InApp),
        Ok(P::DynamicBarcode) => Some(Scene::DynamicBarcode),
        Ok(P::StaticBarcode) => Some(Scene::StaticBarcode),
        Ok(P::Online) => Some(Scene::Online),
        Ok(P::Unspecified) | Err(_) => None,
    }
}

fn category_from_proto(value: i32) -> Result<FactorCategory> {
    use proto::FactorCategory as P;
    match P::try_from(value) {
        Ok(P::Knowledge) => Ok(FactorCategory::Knowledge),
        Ok(P::Possession) => Ok(FactorCategory::Possession),
        Ok(P::Inherence) => Ok(FactorCategory::Inherence),
        Ok(P::Unspecified) | Err(_) => Err(Error::invalid(
            "factors.category",
            "must be KNOWLEDGE, POSSESSION or INHERENCE",
        )),
    }
}

fn category_to_proto(category: FactorCategory) -> i32 {
    use proto::FactorCategory as P;
    (match category {
        FactorCategory::Knowledge => P::Knowledge,
        FactorCategory::Possession => P::Possession,
        FactorCategory::Inherence => P::Inherence,
    }) as i32
}

fn tier_to_proto(tier: Tier) -> i32 {
    use proto::Tier as P;
    (match tier {
        Tier::A => P::A,
        Tier::B => P::B,
        Tier::C => P::C,
        Tier::D => P::D,
    }) as i32
}

fn verdict_to_proto(verdict: Verdict) -> i32 {
    use proto::Verdict as P;
    (match verdict {
        Verdict::Verified => P::Verified,
        Verdict::UnknownCertificate => P::UnknownCertificate,
        Verdict::CertificateRevoked => P::CertificateRevoked,
        Verdict::CertificateExpired => P::CertificateExpired,
        Verdict::BadSignature => P::BadSignature,
        Verdict::MalformedIntent => P::MalformedIntent,
        Verdict::IdentityMismatch => P::IdentityMismatch,
        Verdict::TransactionMismatch => P::TransactionMismatch,
        Verdict::StaleTimestamp => P::StaleTimestamp,
        Verdict::ReplayedNonce => P::ReplayedNonce,
    }) as i32
}

/// The parts VerifyPayment and QualifyTransaction answer alike: tier, factor categories,
/// limit status and evidence id.
fn decision_to_proto(decision: Decision) -> (i32, Vec<i32>, Option<proto::LimitStatus>, String) {
    (
        tier_to_proto(decision.tier),
        decision
            .categories
            .into_iter()
            .map(category_to_proto)
            .collect(),
        decision.limit.map(limit_to_proto),
        decision.evidence_id,
    )
}

fn limit_to_proto(limit: LimitStatus) -> proto::LimitStatus {
    proto::LimitStatus {
        tier: tier_to_proto(limit.tier),
        limit_fen: limit.limit_fen,
        used_fen: limit.used_fen,
        remaining_fen: limit.remaining_fen,
        fits: limit.fits,
        reserved: limit.reserved,
        day: limit.day,
        binding_tier: tier_to_proto(limit.binding_tier),
        ceilings: limit
            .ceilings
            .into_iter()
            .map(|ceiling| proto::LimitCeiling {
                tier: tier_to_proto(ceiling.tier),
                counts: ceiling.counts.iter().map(|t| tier_to_proto(*t)).collect(),
                limit_fen: ceiling.limit_fen,
                used_fen: ceiling.used_fen,
                remaining_fen: ceiling.remaining_fen,
            })
            .collect(),
    }
}

fn factors_from_proto(factors: Vec<proto::Factor>) -> Result<Vec<Factor>> {
    factors
        .into_iter()
        .map(|f| {
            Ok(Factor {
                category: category_from_proto(f.category)?,
                method: f.method,
            })
        })
        .collect()
}

fn transaction_from_proto(tx: Option<proto::Transaction>) -> Result<Transaction> {
    let tx = tx.ok_or_else(|| Error::invalid("transaction", "is required"))?;
    Ok(Transaction {
        merchant_id: tx.merchant_id,
        order_id: tx.order_id,
        amount_fen: tx.amount_fen,
        currency: tx.currency,
    })
}

/// Decodes the signed intent bytes; the verdict for a failure is decided after the
/// signature check.
fn decode_intent(bytes: &[u8]) -> std::result::Result<PaymentIntent, String> {
    let intent = <proto::PaymentIntent as prost::Message>::decode(bytes)
        .map_err(|e| format!("not a payra.v1.PaymentIntent: {e}"))?;
    Ok(PaymentIntent {
        customer_id: intent.customer_id,
        device_id: intent.device_id,
        merchant_id: intent.merchant_id,
        order_id: intent.order_id,
        amount_fen: intent.amount_fen,
        currency: intent.currency,
        created_at_ms: intent.created_at_ms,
        nonce: intent.nonce,
        scene: scene_from_proto(intent.scene),
    })
}

impl TryFrom<proto::VerifyPaymentRequest> for VerifyRequest {
    type Error = Error;
    fn try_from(request: proto::VerifyPaymentRequest) -> Result<VerifyRequest> {
        Ok(VerifyRequest {
            intent: decode_intent(&request.intent),
            intent_bytes: request.intent,
            signature: request.signature,
            serial: Serial::parse("certificate_serial", &request.certificate_serial)?,
            transaction: transaction_from_proto(request.transaction)?,
            factors: factors_from_proto(request.factors)?,
            reserve: request.reserve,
        })
    }
}

impl TryFrom<proto::QualifyTransactionRequest> for QualifyRequest {
    type Error = Error;
    fn try_from(request: proto::QualifyTransactionRequest) -> Result<QualifyRequest> {
        Ok(QualifyRequest {
            customer: CustomerId::parse("customer_id", &request.customer_id)?,
            transaction: transaction_from_proto(request.transaction)?,
            factors: factors_from_proto(request.factors)?,
            scene: scene_from_proto(request.scene).ok_or_else(|| {
                Error::invalid(
                    "scene",
                    "must be IN_APP, DYNAMIC_BARCODE, STATIC_BARCODE or ONLINE",
                )
            })?,
            reserve: request.reserve,
        })
    }
}

/// `payra.v1.Verification`.
pub struct VerificationService {
    pub ra: Arc<Ra>,
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
        let verdict = verdict_to_proto(decision.verdict);
        let reason = decision.reason.clone();
        let certificate_factor = match decision.certificate_factor {
            None => proto::CertificateFactor::Unspecified,
            Some(CertificateFactor::NotCounted) => proto::CertificateFactor::NotCounted,
            Some(CertificateFactor::Possession) => proto::CertificateFactor::Possession,
            Some(CertificateFactor::Certificate) => proto::CertificateFactor::Certificate,
        } as i32;
        let certificate_factor_reason =
            decision.certificate_factor_note.clone().unwrap_or_default();
        let (tier, categories, limit, evidence_id) = decision_to_proto(decision);
        Ok(Response::new(proto::VerifyPaymentResponse {
            verdict,
            reason,
            tier,
            categories,
            limit,
            evidence_id,
            certificate_factor,
            certificate_factor_reason,
        }))
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
        self.ra.cache_from_store(&serial).await?;
        let view = self.ra.certificate_status(&serial)?;
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

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn get_certificate(
        &self,
        request: Request<proto::GetCertificateRequest>,
    ) -> Result<Response<proto::CertificateRecord>, Status> {
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let ra = self.ra.clone();
        let record = blocking(move || ra.certificate(&serial)).await?;
        let view = self.ra.status_of(&record);
        Ok(Response::new(record_to_proto(
            record,
            &view,
            &self.ra.attestation_policy(),
        )?))
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
        let view = self.ra.status_of(&record);
        Ok(Response::new(record_to_proto(
            record,
            &view,
            &self.ra.attestation_policy(),
        )?))
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
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary intent bytes decode or give a reason; never a panic.
        #[test]
        fn intent_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Err(reason) = decode_intent(&bytes) {
                prop_assert!(reason.starts_with("not a payra.v1.PaymentIntent"));
            }
        }

        /// A valid intent with bytes flipped decodes to something or is refused.
        #[test]
        fn mutated_intent_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let intent = proto::PaymentIntent {
                customer_id: "c".into(),
                device_id: "d".into(),
                merchant_id: "m".into(),
                order_id: "o".into(),
                amount_fen: 1234,
                currency: "CNY".into(),
                created_at_ms: 1_800_000_000_000,
                nonce: vec![9; 32],
                scene: proto::Scene::InApp as i32,
            };
            let mut bytes = prost::Message::encode_to_vec(&intent);
            for (index, byte) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= byte;
            }
            let _ = decode_intent(&bytes);
        }
    }
}
