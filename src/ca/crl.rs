//! Building the CRL (RFC 5280 section 5) from the revoked certificates.

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

use super::pki::SharedSigner;
use crate::error::{Error, Result};
use crate::model::{RevocationReason, Serial};

/// One entry of the CRL.
#[derive(Debug, Clone)]
pub struct CrlEntry {
    pub serial: Serial,
    pub revoked_at_s: i64,
    pub reason: RevocationReason,
}

fn rcgen_reason(reason: RevocationReason) -> rcgen::RevocationReason {
    match reason {
        RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
        RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
        RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold => rcgen::RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
    }
}

fn at(seconds: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|e| Error::internal(format!("time out of range: {e}")))
}

/// Signs a CRL numbered `number` with thisUpdate `this_update_s` and nextUpdate
/// `next_update_s`, listing `entries` with their reason codes. The AKI is `issuer_key_id`,
/// the issuing certificate's own SKI, whatever method produced it.
pub fn build_crl(
    issuer: &Issuer<'static, SharedSigner>,
    issuer_key_id: &[u8],
    number: u64,
    this_update_s: i64,
    next_update_s: i64,
    entries: &[CrlEntry],
) -> Result<Vec<u8>> {
    let revoked_certs = entries
        .iter()
        .map(|entry| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.serial.as_bytes()),
                revocation_time: at(entry.revoked_at_s)?,
                // RFC 5280 5.3.1: the unspecified reason code SHOULD be absent.
                reason_code: match entry.reason {
                    RevocationReason::Unspecified => None,
                    other => Some(rcgen_reason(other)),
                },
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update: at(this_update_s)?,
        next_update: at(next_update_s)?,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::PreSpecified(issuer_key_id.to_vec()),
    };
    let crl = params
        .signed_by(issuer)
        .map_err(|e| super::signer::signing_error("signing CRL", e))?;
    Ok(crl.der().to_vec())
}
