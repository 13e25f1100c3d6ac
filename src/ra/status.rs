//! A certificate's status at a given time, derived from its record.

use crate::model::RevocationReason;
use crate::store::{CertificateRecord, Revocation};

/// Where a certificate stands. Revocation wins over expiry: a revoked certificate stays
/// revoked in every answer, expired or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    Valid,
    NotYetValid,
    Expired,
    Revoked,
    Superseded,
    OnHold,
}

impl CertificateStatus {
    /// The status of a certificate that stands so.
    pub fn of(standing: crate::store::Standing) -> CertificateStatus {
        match standing.revocation {
            Some(RevocationReason::CertificateHold) => CertificateStatus::OnHold,
            Some(RevocationReason::Superseded) => CertificateStatus::Superseded,
            Some(_) => CertificateStatus::Revoked,
            None if standing.not_yet_valid => CertificateStatus::NotYetValid,
            None if standing.expired => CertificateStatus::Expired,
            None => CertificateStatus::Valid,
        }
    }
}

/// A certificate's status with the facts behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    pub status: CertificateStatus,
    pub not_after_s: i64,
    pub revocation: Option<Revocation>,
}

impl StatusView {
    /// The status of `record` at `now_s`.
    pub fn of(record: &CertificateRecord, now_s: i64) -> StatusView {
        Self::at(
            record.not_before_s,
            record.not_after_s,
            record.revocation,
            now_s,
        )
    }

    /// The status of a certificate with these facts at `now_s`.
    pub fn at(
        not_before_s: i64,
        not_after_s: i64,
        revocation: Option<Revocation>,
        now_s: i64,
    ) -> StatusView {
        let status = CertificateStatus::of(crate::store::Standing {
            revocation: revocation.map(|r| r.reason),
            not_yet_valid: now_s < not_before_s,
            expired: now_s >= not_after_s,
        });
        StatusView {
            status,
            not_after_s,
            revocation,
        }
    }
}
