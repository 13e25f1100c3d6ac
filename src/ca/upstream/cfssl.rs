//! The CFSSL connector: `POST /api/v1/cfssl/authsign` (the request authenticated with the
//! signing profile's HMAC-SHA256 key) and `POST /api/v1/cfssl/revoke` (which needs CFSSL's
//! certificate database, `cfssl serve -db-config`).
//!
//! What CFSSL's API allows shapes the profile: payra sets the subject (`CN=<subscriber
//! reference>, O=payra device`) and strips the CSR's names (`hosts: []`); CFSSL's signing
//! profile decides key usage, extended key usage, validity and the CRL and OCSP URLs, which
//! payra then checks. CFSSL's sign API cannot add other extensions, so upstream certificates
//! carry no `urn:payra:` names: payra knows them by issuer and serial.

use base64::Engine;
use serde::Deserialize;

use super::http::HttpTarget;
use super::{BoxFuture, RevocationRequest, SigningRequest, UpstreamCa, UpstreamFailure};
use crate::config::UpstreamConfig;
use crate::error::{Error, Result};

/// CFSSL's error code for a certificate its database does not hold (CertStoreError +
/// RecordNotFound).
const RECORD_NOT_FOUND: i64 = 11200;

/// A CFSSL server's HTTP API.
pub struct Cfssl {
    url: String,
    status: super::StatusSource,
    target: HttpTarget,
    profile: String,
    auth_key: ring::hmac::Key,
}

#[derive(Deserialize)]
struct Answer {
    success: bool,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    errors: Vec<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

impl Cfssl {
    /// The CFSSL server `config` names, with the profile's HMAC key from `auth_key_file` or
    /// the environment.
    pub fn from_config(config: &UpstreamConfig) -> Result<Cfssl> {
        let url = config
            .url
            .clone()
            .ok_or_else(|| Error::invalid("ca.upstream.url", "is required in upstream mode"))?;
        let key_hex = match &config.auth_key_file {
            Some(path) => crate::ca::pki::read_private_key(path)?,
            None => crate::secrets::env_secret(&config.auth_key_env).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "the upstream CA's HMAC key: set ca.upstream.auth_key_file or ${}",
                    config.auth_key_env
                ))
            })?,
        };
        let key = hex::decode(key_hex.trim()).map_err(|_| {
            Error::FailedPrecondition(
                "the upstream CA's HMAC key must be hexadecimal (as in CFSSL's auth_keys)".into(),
            )
        })?;
        if key.len() < 16 {
            return Err(Error::FailedPrecondition(
                "the upstream CA's HMAC key is shorter than 16 octets".into(),
            ));
        }
        Ok(Cfssl {
            target: HttpTarget::new(
                &url,
                config.tls_ca_file.as_deref(),
                std::time::Duration::from_millis(u64::from(config.connect_timeout_ms)),
                config.max_in_flight,
            )?,
            url,
            // `cfssl serve` publishes no CRL or OCSP of its own (`cfssl ocspserve` and a CRL
            // job do, at the URLs its signing profile puts into certificates).
            status: super::StatusSource::from_config(config),
            profile: config.profile.clone(),
            auth_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        })
    }

    /// POSTs `body` to `path` and reads CFSSL's answer envelope.
    async fn call(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> std::result::Result<Option<serde_json::Value>, UpstreamFailure> {
        let (status, answer) = self.target.post_json(path, body).await?;
        let parsed: Option<Answer> = serde_json::from_slice(&answer).ok();
        match parsed {
            Some(Answer {
                success: true,
                result,
                ..
            }) if status.is_success() => Ok(result),
            Some(Answer { errors, .. }) if status.is_client_error() || !errors.is_empty() => {
                let what: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{} (code {})", e.message, e.code))
                    .collect();
                let failure = format!("{path} answered {status}: {}", what.join("; "));
                if status.is_server_error() && !errors.iter().any(|e| e.code == RECORD_NOT_FOUND) {
                    Err(UpstreamFailure::Unreachable(failure))
                } else if errors.iter().any(|e| e.code == RECORD_NOT_FOUND) {
                    Err(UpstreamFailure::Refused(format!("{failure} [not found]")))
                } else {
                    Err(UpstreamFailure::Refused(failure))
                }
            }
            _ => Err(UpstreamFailure::Unreachable(format!(
                "{path} answered {status} with {} bytes that are not a CFSSL answer",
                answer.len()
            ))),
        }
    }
}

impl UpstreamCa for Cfssl {
    fn describe(&self) -> String {
        format!("cfssl at {}", self.url)
    }

    fn status_source(&self) -> super::StatusSource {
        self.status.clone()
    }

    fn sign<'a>(
        &'a self,
        request: &'a SigningRequest,
    ) -> BoxFuture<'a, std::result::Result<Vec<u8>, UpstreamFailure>> {
        Box::pin(async move {
            let csr_pem = pem::encode(&pem::Pem::new(
                "CERTIFICATE REQUEST",
                request.csr_der.clone(),
            ));
            let inner = serde_json::json!({
                "certificate_request": csr_pem,
                "profile": self.profile,
                "subject": {
                    "CN": request.common_name,
                    "names": [{ "O": request.organization }],
                },
                // An empty list, not none: CFSSL then puts none of the CSR's names in.
                "hosts": [],
            })
            .to_string();
            let token = ring::hmac::sign(&self.auth_key, inner.as_bytes());
            let b64 = base64::engine::general_purpose::STANDARD;
            let body = serde_json::json!({
                "token": b64.encode(token.as_ref()),
                "request": b64.encode(inner.as_bytes()),
            })
            .to_string()
            .into_bytes();
            let result = self.call("/api/v1/cfssl/authsign", body).await?;
            let certificate = result
                .as_ref()
                .and_then(|r| r.get("certificate"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| {
                    UpstreamFailure::Unreachable("authsign answered without a certificate".into())
                })?;
            let block = pem::parse(certificate).map_err(|e| {
                UpstreamFailure::Unreachable(format!("authsign's certificate is not PEM: {e}"))
            })?;
            Ok(block.into_contents())
        })
    }

    fn revoke<'a>(
        &'a self,
        request: &'a RevocationRequest,
    ) -> BoxFuture<'a, std::result::Result<(), UpstreamFailure>> {
        Box::pin(async move {
            let serial = decimal(request.serial.as_bytes());
            let reason = reason_name(request.reason);
            // CFSSL keys its records by serial and the hex authorityKeyIdentifier; 1.2 stores
            // an empty one, so that is tried when the first finds nothing.
            let mut last = None;
            for aki in [hex::encode(&request.authority_key_id), String::new()] {
                let body = serde_json::json!({
                    "serial": serial,
                    "authority_key_id": aki,
                    "reason": reason,
                })
                .to_string()
                .into_bytes();
                match self.call("/api/v1/cfssl/revoke", body).await {
                    Ok(_) => return Ok(()),
                    Err(UpstreamFailure::Refused(message)) if message.ends_with("[not found]") => {
                        last = Some(UpstreamFailure::Refused(message));
                        if request.authority_key_id.is_empty() {
                            break;
                        }
                    }
                    Err(other) => return Err(other),
                }
            }
            Err(last.unwrap_or_else(|| UpstreamFailure::Refused("revoke failed".into())))
        })
    }
}

/// CFSSL's name of a revocation reason.
fn reason_name(reason: crate::model::RevocationReason) -> &'static str {
    use crate::model::RevocationReason as R;
    match reason {
        R::Unspecified => "unspecified",
        R::KeyCompromise => "keycompromise",
        R::AffiliationChanged => "affiliationchanged",
        R::Superseded => "superseded",
        R::CessationOfOperation => "cessationofoperation",
        R::CertificateHold => "certificatehold",
        R::PrivilegeWithdrawn => "privilegewithdrawn",
    }
}

/// The decimal digits of a big-endian unsigned integer (CFSSL names serials in decimal).
pub fn decimal(big_endian: &[u8]) -> String {
    let mut number: Vec<u8> = big_endian.to_vec();
    let mut digits = Vec::new();
    while number.iter().any(|b| *b != 0) {
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = (value / 10) as u8;
            remainder = value % 10;
        }
        digits.push(b'0' + remainder as u8);
    }
    if digits.is_empty() {
        return "0".into();
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_named_in_decimal() {
        assert_eq!(decimal(&[]), "0");
        assert_eq!(decimal(&[0x01, 0x00]), "256");
        assert_eq!(decimal(&[0xff; 8]), u64::MAX.to_string());
        // The 20-octet serial CFSSL gave a certificate, as its database lists it.
        let serial = hex::decode("6aa79027e0b24b4f149b7c8eeec1b58efd03e3d0").unwrap();
        assert_eq!(
            decimal(&serial),
            "608889803894340914368230044170304879399912334288"
        );
    }
}
