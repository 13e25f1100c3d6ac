//! Storage in domain words. [`Store`] is the seam a second backend (PostgreSQL) plugs into;
//! [`SledStore`] is the embedded default. Every mutating method returns only after its change
//! is on stable storage, and changes that belong together commit atomically.

#[cfg(test)]
mod conformance;
mod group_commit;
mod records;
mod sled_backend;

pub use group_commit::GroupCommit;
pub use records::{
    CertificateRecord, Revocation, RevokedEntry, TokenHash, TokenRecord, RECORD_VERSION,
};
pub use sled_backend::SledStore;

use crate::error::Result;
use crate::model::{CustomerId, DeviceId, Serial};

/// Why a token could not be consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    Unknown,
    Expired { expired_at_s: i64 },
    AlreadyUsed { used_at_s: i64 },
}

/// The outcome of [`Store::issue_with_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    Issued,
    TokenRejected(TokenRejection),
    /// The serial exists already (a random collision); nothing was written.
    SerialTaken,
}

/// Why a certificate could not be revoked, renewed or released from hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeRejection {
    NotFound(Serial),
    AlreadyRevoked(Serial, Revocation),
    /// Unhold of a certificate that is not on hold.
    NotOnHold(Serial),
}

/// Persistent state of the RA and CA.
pub trait Store: Send + Sync {
    /// Stores a new enrollment token under its hash. Durable on return.
    fn put_token(&self, hash: &TokenHash, token: &TokenRecord) -> Result<()>;

    /// The token stored under `hash`, if any.
    fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>>;

    /// Atomically checks that the token is known, unexpired at `now_s` and unused, marks it
    /// used by `certificate`, and stores `certificate` with its indexes. Exactly one of any
    /// number of concurrent calls with one token returns `Issued`. Durable on return; on any
    /// other outcome nothing was written.
    fn issue_with_token(
        &self,
        hash: &TokenHash,
        now_s: i64,
        certificate: &CertificateRecord,
    ) -> Result<IssueOutcome>;

    /// The certificate with `serial`, if payra issued it.
    fn certificate(&self, serial: &Serial) -> Result<Option<CertificateRecord>>;

    /// Serials of the certificates issued to `customer`, in serial order.
    fn serials_by_customer(&self, customer: &CustomerId) -> Result<Vec<Serial>>;

    /// Serials of the certificates issued to `device`, in serial order.
    fn serials_by_device(&self, device: &DeviceId) -> Result<Vec<Serial>>;

    /// Up to `limit` certificates in serial order, starting after `after`.
    fn certificates_after(
        &self,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<Vec<CertificateRecord>>;

    /// Revokes every serial in `serials` with `revocation`, all or none: if any is unknown or
    /// already revoked, nothing is written and the first such serial is reported. A
    /// certificate on hold may be revoked for good (RFC 5280 5.3.1): its entry is replaced.
    /// Durable on return.
    fn revoke(
        &self,
        serials: &[Serial],
        revocation: &Revocation,
    ) -> Result<Result<(), RevokeRejection>>;

    /// Releases a certificate from certificateHold. Durable on return.
    fn unhold(&self, serial: &Serial) -> Result<Result<CertificateRecord, RevokeRejection>>;

    /// Atomically marks `old` superseded by `new` (revocation reason superseded at
    /// `revoked_at_s`) and stores `new` with its indexes. `old` must be unrevoked. Durable on
    /// return.
    fn renew(
        &self,
        old: &Serial,
        new: &CertificateRecord,
        revoked_at_s: i64,
    ) -> Result<Result<(), RevokeRejection>>;

    /// Every revoked certificate (including those on hold), for the CRL.
    fn revoked_entries(&self) -> Result<Vec<RevokedEntry>>;

    /// Takes the next CRL number: strictly greater than every number taken before, across
    /// restarts. Durable on return.
    fn next_crl_number(&self) -> Result<u64>;
}
