//! RA mode's configuration (`[ca]`, `[ca.upstream]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who signs device certificates (`[ca]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    pub mode: CaMode,
    /// The external CA, for `mode = "upstream"` (`[ca.upstream]`).
    pub upstream: UpstreamConfig,
}

/// Whether payra signs device certificates itself or is the RA of an external CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaMode {
    /// payra's issuing CA signs (the default).
    #[default]
    Local,
    /// An external CA signs and revokes device certificates; payra stays the RA. payra's own
    /// CA still signs the server's and the payment services' and operators' certificates.
    Upstream,
}

/// Which protocol the upstream CA speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// CFSSL's HTTP API: `authsign` with an HMAC key, `revoke` against its certificate
    /// database.
    #[default]
    Cfssl,
}

/// The external CA of RA mode (`[ca.upstream]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub kind: UpstreamKind,
    /// Base URL of its API, `http://host:port` or `https://host:port`.
    pub url: Option<String>,
    /// The upstream's signing profile for device certificates.
    pub profile: String,
    /// PEM file with the upstream CA that signs device certificates first, then any
    /// intermediates up to (not including) the root. Returned certificates must be signed by
    /// the first; phones get the whole file as their chain.
    pub issuer_file: Option<PathBuf>,
    /// File holding the hex HMAC key of the signing profile (mode 0600). Unset, the
    /// environment variable `auth_key_env`.
    pub auth_key_file: Option<PathBuf>,
    pub auth_key_env: String,
    /// PEM file of the authorities that sign an `https://` upstream's server certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// Milliseconds to wait for a connection to the upstream.
    pub connect_timeout_ms: u32,
    /// Milliseconds one upstream request may take in all; an enrollment that waits longer is
    /// answered UNAVAILABLE.
    pub timeout_ms: u32,
    /// Upstream requests in flight from this process, at most; an enrollment beyond them is
    /// answered UNAVAILABLE at once rather than queued behind a slow upstream.
    pub max_in_flight: usize,
    /// Seconds between attempts to confirm revocations the upstream has not confirmed yet.
    pub retry_interval_s: u32,
    /// The CRL distribution point and OCSP URL the upstream puts into device certificates:
    /// when set, a certificate without exactly this one is refused.
    pub crl_url: Option<String>,
    pub ocsp_url: Option<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            kind: UpstreamKind::Cfssl,
            url: None,
            profile: "device".into(),
            issuer_file: None,
            auth_key_file: None,
            auth_key_env: "PAYRA_UPSTREAM_AUTH_KEY".into(),
            tls_ca_file: None,
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            max_in_flight: 64,
            retry_interval_s: 30,
            crl_url: None,
            ocsp_url: None,
        }
    }
}

impl CaConfig {
    pub(crate) fn validate(&self, issuance: &crate::config::IssuanceConfig) -> Result<()> {
        if self.mode == CaMode::Local {
            return Ok(());
        }
        let upstream = &self.upstream;
        let url = upstream.url.as_deref().ok_or_else(|| {
            Error::invalid("ca.upstream.url", "is required with ca.mode = \"upstream\"")
        })?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::invalid(
                "ca.upstream.url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if upstream.issuer_file.is_none() {
            return Err(Error::invalid(
                "ca.upstream.issuer_file",
                "is required with ca.mode = \"upstream\": payra checks every certificate the \
                 upstream returns against its issuing CA",
            ));
        }
        if upstream.profile.is_empty() {
            return Err(Error::invalid("ca.upstream.profile", "must not be empty"));
        }
        if upstream.timeout_ms == 0 || upstream.connect_timeout_ms == 0 {
            return Err(Error::invalid(
                "ca.upstream.timeout_ms",
                "timeout_ms and connect_timeout_ms must be at least 1",
            ));
        }
        if upstream.max_in_flight == 0 || upstream.retry_interval_s == 0 {
            return Err(Error::invalid(
                "ca.upstream.max_in_flight",
                "max_in_flight and retry_interval_s must be at least 1",
            ));
        }
        if issuance
            .key_algorithms
            .as_ref()
            .is_some_and(|list| list.contains(&crate::model::KeyAlgorithm::Sm2))
        {
            return Err(Error::invalid(
                "issuance.key_algorithms",
                "lists \"sm2\", but an upstream CA signs P-256 device keys only here (its \
                 connector sends a standard CSR); leave SM2 to local mode",
            ));
        }
        Ok(())
    }
}
