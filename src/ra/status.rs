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
        let status = match revocation {
            Some(Revocation {
                reason: RevocationReason::CertificateHold,
                ..
            }) => CertificateStatus::OnHold,
            Some(Revocation {
                reason: RevocationReason::Superseded,
                ..
            }) => CertificateStatus::Superseded,
            Some(_) => CertificateStatus::Revoked,
            None if now_s < not_before_s => CertificateStatus::NotYetValid,
            None if now_s >= not_after_s => CertificateStatus::Expired,
            None => CertificateStatus::Valid,
        };
        StatusView {
            status,
            not_after_s,
            revocation,
        }
    }
}
