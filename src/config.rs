//! One validated [`Config`], built from defaults, then a TOML file, then the environment and
//! flags (the CLI applies those last two, so flags > environment > file > defaults).
//! Unknown keys in the file are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything `payra serve` needs to know.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the gRPC (TLS) listener binds.
    pub grpc_addr: SocketAddr,
    /// Where the plain HTTP listener (CRL, OCSP, metrics, health) binds.
    pub http_addr: SocketAddr,
    /// Directory with the PKI files `payra init` writes.
    pub certs_dir: PathBuf,
    /// Directory of the embedded database.
    pub data_dir: PathBuf,
    /// Base URL under which relying parties reach the HTTP listener; issued certificates carry
    /// `{public_base_url}/crl` and `{public_base_url}/ocsp`.
    pub public_base_url: String,
    /// File holding the passphrase of an encrypted issuing key (mode 0600). The environment
    /// variable `PAYRA_CA_KEY_PASSPHRASE` is used when this is not set.
    pub ca_key_passphrase_file: Option<PathBuf>,
    pub issuance: IssuanceConfig,
    pub tokens: TokenConfig,
    pub limits: LimitConfig,
    pub revocation: RevocationConfig,
    pub verification: VerificationConfig,
    pub ledger: LedgerConfig,
    pub retention: RetentionConfig,
}

/// What is deleted, and when.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Certificate records are deleted this many days after they expire (0 keeps them
    /// forever). Expired nonces and expired tokens are always purged.
    pub expired_certificate_days: u32,
    /// How often the retention run starts in the background, in seconds.
    pub interval_s: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            expired_certificate_days: 730,
            interval_s: 3600,
        }
    }
}

/// Payment verification.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationConfig {
    /// How far an intent's created_at may be from the server's clock, either way.
    pub skew_s: u32,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig { skew_s: 120 }
    }
}

/// The daily limit ledger. Amounts are fen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Offset from UTC of the time zone whose calendar day the limits count in. China has
    /// no daylight saving time, so Asia/Shanghai is a fixed +08:00 (28800 s).
    pub utc_offset_s: i32,
    /// Tier A limit for customers without an agreed limit (`payra.v1.Admin/SetAgreedLimit`).
    pub default_agreed_limit_fen: i64,
    pub limit_b_fen: i64,
    pub limit_c_fen: i64,
    pub limit_d_fen: i64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            utc_offset_s: 8 * 3600,
            default_agreed_limit_fen: 5_000_000,
            limit_b_fen: 500_000,
            limit_c_fen: 100_000,
            limit_d_fen: 50_000,
        }
    }
}

/// CRL and OCSP publication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// nextUpdate of each CRL is thisUpdate plus this; a new CRL is signed at half of it.
    pub crl_validity_s: u32,
    /// nextUpdate of OCSP responses is thisUpdate plus this; cached responses are re-signed
    /// at half of it, and at once on any revocation.
    pub ocsp_validity_s: u32,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            crl_validity_s: 86_400,
            ocsp_validity_s: 3_600,
        }
    }
}

/// The certificate profile's adjustable parts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuanceConfig {
    /// Lifetime of a device certificate, in days.
    pub validity_days: u32,
    /// How far notBefore is set back from the issuance time, for phones with slow clocks.
    pub backdate_s: u32,
}

/// Enrollment token lifetimes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// TTL used when the request leaves it at 0.
    pub default_ttl_s: u32,
    /// Largest TTL a caller may ask for.
    pub max_ttl_s: u32,
}

/// Abuse limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitConfig {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most simultaneous gRPC connections; further clients wait in the accept queue.
    pub max_connections: usize,
    /// Deadline of every RPC, in seconds.
    pub request_timeout_s: u32,
    /// Failed enrollment-token lookups allowed per peer address per minute; 0 switches the
    /// throttle off.
    pub enroll_failures_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            certs_dir: PathBuf::from("certs"),
            data_dir: PathBuf::from("data"),
            public_base_url: "http://127.0.0.1:8080".to_string(),
            ca_key_passphrase_file: None,
            issuance: IssuanceConfig::default(),
            tokens: TokenConfig::default(),
            limits: LimitConfig::default(),
            revocation: RevocationConfig::default(),
            verification: VerificationConfig::default(),
            ledger: LedgerConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        IssuanceConfig {
            validity_days: 365,
            backdate_s: 300,
        }
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            default_ttl_s: 600,
            max_ttl_s: 86_400,
        }
    }
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            max_message_bytes: 64 * 1024,
            max_connections: 4096,
            request_timeout_s: 30,
            enroll_failures_per_minute: 20,
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults and validates the result.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid("config", format!("{}: {e}", path.display())))?;
        Config::from_toml(&text)
    }

    /// Parses TOML text over the defaults and validates the result.
    pub fn from_toml(text: &str) -> Result<Config> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::invalid("config", e.message()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules no type expresses.
    pub fn validate(&self) -> Result<()> {
        if self.issuance.validity_days == 0 || self.issuance.validity_days > 3650 {
            return Err(Error::invalid(
                "issuance.validity_days",
                "must be between 1 and 3650",
            ));
        }
        if self.tokens.default_ttl_s == 0 || self.tokens.default_ttl_s > self.tokens.max_ttl_s {
            return Err(Error::invalid(
                "tokens.default_ttl_s",
                "must be at least 1 and at most tokens.max_ttl_s",
            ));
        }
        if !(self.public_base_url.starts_with("http://")
            || self.public_base_url.starts_with("https://"))
        {
            return Err(Error::invalid(
                "public_base_url",
                "must start with http:// or https://",
            ));
        }
        if self.limits.max_message_bytes < 16 * 1024 {
            return Err(Error::invalid(
                "limits.max_message_bytes",
                "must be at least 16384 (a CSR may be 8 KiB)",
            ));
        }
        if self.limits.max_connections == 0 || self.limits.request_timeout_s == 0 {
            return Err(Error::invalid(
                "limits",
                "max_connections and request_timeout_s must be at least 1",
            ));
        }
        if self.revocation.crl_validity_s < 60 || self.revocation.ocsp_validity_s < 60 {
            return Err(Error::invalid(
                "revocation",
                "crl_validity_s and ocsp_validity_s must be at least 60",
            ));
        }
        if self.verification.skew_s == 0 || self.verification.skew_s > 3600 {
            return Err(Error::invalid(
                "verification.skew_s",
                "must be between 1 and 3600",
            ));
        }
        if self.ledger.utc_offset_s.abs() > 14 * 3600 {
            return Err(Error::invalid(
                "ledger.utc_offset_s",
                "must be within ±14 hours (±50400 s)",
            ));
        }
        for (field, value) in [
            (
                "ledger.default_agreed_limit_fen",
                self.ledger.default_agreed_limit_fen,
            ),
            ("ledger.limit_b_fen", self.ledger.limit_b_fen),
            ("ledger.limit_c_fen", self.ledger.limit_c_fen),
            ("ledger.limit_d_fen", self.ledger.limit_d_fen),
        ] {
            if value < 0 {
                return Err(Error::invalid(field, "must not be negative"));
            }
        }
        Ok(())
    }

    /// URL of the CRL, as put into issued certificates.
    pub fn crl_url(&self) -> String {
        format!("{}/crl", self.public_base_url.trim_end_matches('/'))
    }

    /// URL of the OCSP responder, as put into issued certificates.
    pub fn ocsp_url(&self) -> String {
        format!("{}/ocsp", self.public_base_url.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_empty_file_gives_defaults() {
        let config = Config::from_toml("").expect("empty config");
        assert_eq!(config.grpc_addr.port(), 8443);
        assert_eq!(config.issuance.validity_days, 365);
        assert_eq!(config.crl_url(), "http://127.0.0.1:8080/crl");
    }

    #[test]
    fn ok_example_file_is_valid_and_states_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/payra.example.toml"))
                .unwrap();
        let from_file = Config::from_toml(&text).expect("payra.example.toml is valid");
        let defaults = Config::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&defaults).unwrap(),
            "payra.example.toml must show the defaults"
        );
    }

    #[test]
    fn fail_unknown_key_is_named() {
        let err = Config::from_toml("[issuance]\nvalidty_days = 3\n").unwrap_err();
        assert!(err.to_string().contains("validty_days"), "{err}");
    }

    #[test]
    fn fail_default_ttl_above_max() {
        let err = Config::from_toml("[tokens]\ndefault_ttl_s = 100\nmax_ttl_s = 50\n").unwrap_err();
        assert!(err.to_string().contains("tokens.default_ttl_s"), "{err}");
    }
}
