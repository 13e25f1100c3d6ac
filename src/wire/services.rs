//! The tonic services. Each handler: authorize → parse the proto into domain types → call the
//! RA off the async executor → convert the answer. RPCs later work implements answer
//! UNIMPLEMENTED through the generated default methods.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::auth::{authorize, Rpc};
use super::proto;
use crate::error::{Error, Result};
use crate::model::{CustomerId, DeviceId, DeviceInfo, RevocationReason, Serial};
use crate::ra::{
    CertificateQuery, CertificateStatus, EnrollRequest, Ra, RenewRequest, RevokeOutcome, StatusView,
};
use crate::store::CertificateRecord;

/// Runs blocking RA work (storage sync, signing) on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
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
            token: request.token,
            csr_der: request.csr_der,
            device_id: DeviceId::parse("device_id", &request.device_id)?,
            device_info: request
                .device_info
                .map(DeviceInfo::from)
                .unwrap_or_default(),
        })
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
    }
}

fn issued_response(issued: crate::ra::Issued) -> proto::EnrollResponse {
    proto::EnrollResponse {
        certificate_der: issued.certificate_der,
        chain_der: issued.chain_der,
        serial: issued.record.serial.to_hex(),
        not_before_unix_s: issued.record.not_before_s,
        not_after_unix_s: issued.record.not_after_s,
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

fn record_to_proto(record: CertificateRecord, view: &StatusView) -> proto::CertificateRecord {
    let certificate_der = record.certificate_der();
    proto::CertificateRecord {
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
        authorize(&request, Rpc::CreateEnrollmentToken)?;
        let request = request.into_inner();
        let customer = CustomerId::parse("customer_id", &request.customer_id)?;
        let ra = self.ra.clone();
        let token = blocking(move || ra.create_enrollment_token(customer, request.ttl_s)).await?;
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
        authorize(&request, Rpc::Enroll)?;
        let request = EnrollRequest::try_from(request.into_inner())?;
        let ra = self.ra.clone();
        let issued = blocking(move || ra.enroll(request)).await?;
        Ok(Response::new(issued_response(issued)))
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let Caller::Device(current) = authorize(&request, Rpc::Renew)? else {
            return Err(Error::PermissionDenied("Renew needs a device certificate".into()).into());
        };
        let request = request.into_inner();
        let request = RenewRequest {
            current,
            csr_der: request.csr_der,
            device_info: request.device_info.map(DeviceInfo::from),
        };
        let ra = self.ra.clone();
        let issued = blocking(move || ra.renew(request)).await?;
        Ok(Response::new(issued_response(issued)))
    }
}

/// `payra.v1.Verification`.
pub struct VerificationService {
    pub ra: Arc<Ra>,
}

#[tonic::async_trait]
impl proto::verification_server::Verification for VerificationService {
    async fn get_certificate_status(
        &self,
        request: Request<proto::GetCertificateStatusRequest>,
    ) -> Result<Response<proto::GetCertificateStatusResponse>, Status> {
        authorize(&request, Rpc::GetCertificateStatus)?;
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
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
        authorize(&request, Rpc::GetCertificate)?;
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let record = self.ra.certificate(&serial)?;
        let view = self.ra.certificate_status(&serial)?;
        Ok(Response::new(record_to_proto(record, &view)))
    }

    async fn revoke_certificate(
        &self,
        request: Request<proto::RevokeCertificateRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        authorize(&request, Rpc::RevokeCertificate)?;
        let request = request.into_inner();
        let serial = Serial::parse("serial", &request.serial)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome = blocking(move || ra.revoke_certificate(&serial, reason)).await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn revoke_device(
        &self,
        request: Request<proto::RevokeDeviceRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        authorize(&request, Rpc::RevokeDevice)?;
        let request = request.into_inner();
        let device = DeviceId::parse("device_id", &request.device_id)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome = blocking(move || ra.revoke_device(&device, reason, request.dry_run)).await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn revoke_customer(
        &self,
        request: Request<proto::RevokeCustomerRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        authorize(&request, Rpc::RevokeCustomer)?;
        let request = request.into_inner();
        let customer = CustomerId::parse("customer_id", &request.customer_id)?;
        let reason = reason_from_proto(request.reason)?;
        let ra = self.ra.clone();
        let outcome =
            blocking(move || ra.revoke_customer(&customer, reason, request.dry_run)).await?;
        Ok(Response::new(revoke_response(outcome)))
    }

    async fn unhold_certificate(
        &self,
        request: Request<proto::UnholdCertificateRequest>,
    ) -> Result<Response<proto::CertificateRecord>, Status> {
        authorize(&request, Rpc::UnholdCertificate)?;
        let serial = Serial::parse("serial", &request.into_inner().serial)?;
        let ra = self.ra.clone();
        let record = blocking(move || ra.unhold_certificate(&serial)).await?;
        let view = self.ra.certificate_status(&record.serial)?;
        Ok(Response::new(record_to_proto(record, &view)))
    }

    async fn list_certificates(
        &self,
        request: Request<proto::ListCertificatesRequest>,
    ) -> Result<Response<proto::ListCertificatesResponse>, Status> {
        authorize(&request, Rpc::ListCertificates)?;
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
        };
        let ra = self.ra.clone();
        let page = blocking(move || ra.list_certificates(&query)).await?;
        Ok(Response::new(proto::ListCertificatesResponse {
            certificates: page
                .certificates
                .into_iter()
                .map(|(record, view)| record_to_proto(record, &view))
                .collect(),
            next_page_token: page.next.map(|s| s.to_hex()).unwrap_or_default(),
        }))
    }
}
