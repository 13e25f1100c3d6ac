//! The one mapping from domain errors to gRPC statuses.

use tonic::{Code, Status};

use crate::error::{Error, ErrorKind};

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match error.kind() {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Internal => Code::Internal,
        };
        if code == Code::Internal {
            // The details may name files, keys or storage internals: log them, send nothing.
            tracing::error!(error = %error, "internal error");
            return Status::internal("internal error; the server log has the details");
        }
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_are_not_sent() {
        let status = Status::from(Error::internal("opening /secret/path/issuing.key"));
        assert_eq!(status.code(), Code::Internal);
        assert!(
            !status.message().contains("/secret"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(Error::invalid("csr_der", "is required"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "csr_der: is required");
    }
}
