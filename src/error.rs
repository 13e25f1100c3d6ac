//! The domain error type. Every layer below `wire` returns [`Error`]; `wire` maps it to a gRPC
//! status in one place, so a caller always gets the same code for the same problem.

use std::fmt;

/// What went wrong, in domain words. Messages of the client-facing kinds are shown to the
/// caller and must name the field or the rule; [`Error::Internal`] details are logged only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request field is missing, malformed or out of range.
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    /// The caller presented no usable credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the state does not allow it (used token, revoked
    /// certificate, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A rate or size limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// payra cannot take this now (shutting down, or storage stopped after a fault); the
    /// caller may retry elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
    /// An enrollment token that cannot enroll: unknown (`UNAUTHENTICATED`: the token is the
    /// phone's credential), expired or used (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Token(crate::model::TokenRejection),
    /// A revocation or a release from hold that cannot be made: no such certificate
    /// (`NOT_FOUND`), or its state does not allow it (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Revoke(crate::model::RevokeRejection),
    /// A reservation that cannot be given back: unknown evidence (`NOT_FOUND`), nothing
    /// reserved, released already, or of a day the limits no longer count
    /// (`FAILED_PRECONDITION`).
    #[error("{}", .refusal.message(.evidence_id))]
    Release {
        evidence_id: String,
        refusal: crate::model::ReleaseRefusal,
    },
    /// An enrollment's key attestation that was refused: malformed (`INVALID_ARGUMENT`), not
    /// accepted by the policy or not configured (`FAILED_PRECONDITION`), or not proving what
    /// it claims (`PERMISSION_DENIED`). The token stays usable.
    #[error("{0}")]
    Attestation(crate::attestation::AttestationRefusal),
    /// A fault inside payra (storage, signing). The text is for the log, never for the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The coarse class of an [`Error`], for status mapping and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

impl Error {
    /// An invalid-argument error naming `field`.
    pub fn invalid(field: &'static str, message: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            field,
            message: message.to_string(),
        }
    }

    /// An internal error; `context` goes to the log only.
    pub fn internal(context: impl fmt::Display) -> Self {
        Error::Internal(context.to_string())
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Token(crate::model::TokenRejection::Unknown) => ErrorKind::Unauthenticated,
            Error::Token(_) => ErrorKind::FailedPrecondition,
            Error::Revoke(crate::model::RevokeRejection::NotFound(_)) => ErrorKind::NotFound,
            Error::Revoke(_) => ErrorKind::FailedPrecondition,
            Error::Release {
                refusal: crate::model::ReleaseRefusal::NotFound,
                ..
            } => ErrorKind::NotFound,
            Error::Release { .. } => ErrorKind::FailedPrecondition,
            Error::Attestation(refusal) => {
                use crate::attestation::AttestationRefusal as R;
                match refusal {
                    R::Malformed(_) => ErrorKind::InvalidArgument,
                    R::BelowPolicy(_) | R::NotConfigured(_) => ErrorKind::FailedPrecondition,
                    _ => ErrorKind::PermissionDenied,
                }
            }
            Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(format!("io: {e}"))
    }
}

/// Result with the domain [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
