//! One validated [`Config`], built from defaults, then a TOML file, then the environment and
//! flags (the CLI applies those last two, so flags > environment > file > defaults).
//! Unknown keys in the file are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::ca::upstream::config::{CaConfig, CaMode, UpstreamConfig, UpstreamKind};
use crate::error::{Error, Result};
use crate::ra::limits::{
    Accumulation, AGREED_LIMIT_CEILING_FEN, MAX_LIMIT_B_FEN, MAX_LIMIT_C_FEN, MAX_LIMIT_D_FEN,
};

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
    /// `{public_base_url}/crl` and `{public_base_url}/ocsp`. Unset, it is `http://{http_addr}`
    /// (the bound address when the port is 0). Plain `http://` only: relying parties fetch CRLs
    /// and OCSP answers over HTTP (RFC 5280 §4.2.1.13, RFC 6960 App. A), and an https URL would
    /// make checking the server's own chain need a revocation check first.
    pub public_base_url: Option<String>,
    /// File holding the passphrase of an encrypted issuing key (mode 0600). The environment
    /// variable `PAYRA_CA_KEY_PASSPHRASE` is used when this is not set.
    pub ca_key_passphrase_file: Option<PathBuf>,
    /// Start even when the data directory or a file in it is open to the group or others
    /// (logged as a warning). Off: such a start is refused.
    pub allow_readable_data: bool,
    pub issuance: IssuanceConfig,
    pub tokens: TokenConfig,
    pub limits: LimitConfig,
    pub revocation: RevocationConfig,
    pub verification: VerificationConfig,
    pub ledger: LedgerConfig,
    pub retention: RetentionConfig,
    pub audit: AuditConfig,
    pub store: StoreConfig,
    /// The issuing key in a PKCS#11 token instead of `issuing.key` (`[pkcs11]`).
    pub pkcs11: Pkcs11Config,
    /// Device key attestation at enrollment and what it counts for (`[attestation]`).
    pub attestation: crate::attestation::AttestationConfig,
    /// Who signs device certificates: payra's own issuing CA, or an external one (`[ca]`).
    pub ca: CaConfig,
}

/// Where the issuing key is when a PKCS#11 token holds it (`[pkcs11]`). Used when `uri` or
/// `module` is set; the issuing CA certificate stays `issuing.pem` in the certs directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pkcs11Config {
    /// An RFC 7512 URI naming the key, e.g.
    /// `pkcs11:token=payra;object=issuing;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so`
    /// (`pin-source=file:/path` may name the PIN file). The fields below add to it.
    pub uri: Option<String>,
    /// The module (the token vendor's PKCS#11 library).
    pub module: Option<PathBuf>,
    /// The token, by label or by serial number (not by slot: slots are renumbered).
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    /// The key, by label (CKA_LABEL), id (CKA_ID, hex) or both.
    pub key_label: Option<String>,
    pub key_id: Option<String>,
    /// File holding the user PIN (mode 0600). Unset, the environment variable `pin_env`.
    pub pin_file: Option<PathBuf>,
    pub pin_env: String,
    /// Sessions kept open to the token, at most (signatures in parallel).
    pub sessions: usize,
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Pkcs11Config {
            uri: None,
            module: None,
            token_label: None,
            token_serial: None,
            key_label: None,
            key_id: None,
            pin_file: None,
            pin_env: "PAYRA_PKCS11_PIN".into(),
            sessions: 4,
        }
    }
}

impl Pkcs11Config {
    /// Whether the issuing key is in a token.
    pub fn enabled(&self) -> bool {
        self.uri.is_some() || self.module.is_some()
    }
}

/// Which database holds payra's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded database in `data_dir`: one payra process.
    #[default]
    Sled,
    /// A PostgreSQL database shared by any number of payra processes.
    Postgres,
}

/// Where payra keeps its state (`[store]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: Backend,
    /// PostgreSQL connection URL, `postgres://user@host:port/database?sslmode=require`,
    /// without a password (it comes from `password_file` or the environment).
    pub url: Option<String>,
    /// File holding the database password (mode 0600). Unset, the environment variable named
    /// by `password_env` is used, if it is set.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the database password.
    pub password_env: String,
    /// Connections each payra process keeps to the database, at most.
    pub pool_size: usize,
    /// PEM file of the certificate authorities that sign the database server's certificate.
    /// Set, connections use TLS as the URL's `sslmode` says (`require` refuses plain ones);
    /// unset, they are plain and an `sslmode=require` URL is refused.
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for a connection (and for a pooled one to come free) before a request
    /// is answered UNAVAILABLE.
    pub connect_timeout_s: u32,
    /// Decision writers per process (each a chain of its own in the database): while one
    /// batch of verifications waits for its commit, the next is written.
    pub decision_writers: usize,
    /// sled: create a new database with its pages compressed (zstd). 1.6 KB of disk per
    /// certificate instead of 3.7, for CPU on writes and cache misses and a recovery after
    /// a crash that reads and decompresses sled's log (seconds to a minute instead of under
    /// one). An existing database keeps what it was created with.
    pub sled_compression: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sled,
            url: None,
            password_file: None,
            password_env: "PAYRA_DB_PASSWORD".into(),
            pool_size: 16,
            ca_file: None,
            connect_timeout_s: 5,
            decision_writers: 2,
            sled_compression: false,
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<()> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let Some(url) = &self.url else {
            return Err(Error::invalid(
                "store.url",
                "is required with backend = \"postgres\" \
                 (postgres://user@host:port/database)",
            ));
        };
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::invalid("store.url", format!("is not a PostgreSQL URL: {e}")))?;
        if parsed.get_password().is_some() {
            return Err(Error::invalid(
                "store.url",
                format!(
                    "must not carry the password: put it in store.password_file or ${}",
                    self.password_env
                ),
            ));
        }
        if parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require
            && self.ca_file.is_none()
        {
            return Err(Error::invalid(
                "store.ca_file",
                "is required with sslmode=require: the PEM file of the CA that signed the \
                 database server's certificate",
            ));
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return Err(Error::invalid(
                "store.pool_size",
                "must be between 1 and 1024",
            ));
        }
        if self.decision_writers == 0 || self.decision_writers > 16 {
            return Err(Error::invalid(
                "store.decision_writers",
                "must be between 1 and 16",
            ));
        }
        if self.decision_writers >= self.pool_size {
            return Err(Error::invalid(
                "store.decision_writers",
                "must be below store.pool_size (the writers hold connections while they commit)",
            ));
        }
        if self.connect_timeout_s == 0 {
            return Err(Error::invalid(
                "store.connect_timeout_s",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The audit chains.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the chains' heads are signed (when they moved), in seconds; also at
    /// shutdown. What happened since the last signed head is covered by no signature yet.
    pub head_interval_s: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            head_interval_s: 60,
        }
    }
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
    /// The most memory the certificate cache takes, in bytes (0: no cache; every
    /// verification reads the store). About 180 bytes a certificate.
    pub cache_bytes: u64,
}

/// The certificate cache's default size: about 1.5 million certificates.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// The smallest cache: its 64 shards hold about 90 certificates each.
pub const MIN_CACHE_BYTES: u64 = 1024 * 1024;

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            skew_s: 120,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// The daily limit ledger. Amounts are fen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Offset from UTC of the time zone whose calendar day the limits count in. China has
    /// no daylight saving time, so Asia/Shanghai is a fixed +08:00 (28800 s).
    pub utc_offset_s: i32,
    /// How the B, C and D ceilings count the day's payments: `nested` (the PBOC reading,
    /// the default) or `per_tier`.
    pub accumulation: Accumulation,
    /// Tier A limit for customers without an agreed limit (`payra.v1.Admin/SetAgreedLimit`):
    /// the institution's standard-terms figure. Unset, such customers get the B limit.
    pub default_agreed_limit_fen: Option<i64>,
    /// Largest agreed tier-A limit an operator may set.
    pub max_agreed_limit_fen: i64,
    /// PBOC maxima: B 500,000, C 100,000, D 50,000 fen; an institution may only go lower,
    /// with D ≤ C ≤ B.
    pub limit_b_fen: i64,
    pub limit_c_fen: i64,
    pub limit_d_fen: i64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            utc_offset_s: 8 * 3600,
            accumulation: Accumulation::Nested,
            default_agreed_limit_fen: None,
            max_agreed_limit_fen: 1_000_000_000,
            limit_b_fen: 500_000,
            limit_c_fen: 100_000,
            limit_d_fen: 50_000,
        }
    }
}

impl LedgerConfig {
    /// The PBOC maxima and their order (296号 Art. 15): an institution may set lower
    /// ceilings, never higher ones, and a weaker verification never gets more room.
    fn validate(&self) -> Result<()> {
        let ledger = self;
        for (field, value, maximum) in [
            ("ledger.limit_b_fen", ledger.limit_b_fen, MAX_LIMIT_B_FEN),
            ("ledger.limit_c_fen", ledger.limit_c_fen, MAX_LIMIT_C_FEN),
            ("ledger.limit_d_fen", ledger.limit_d_fen, MAX_LIMIT_D_FEN),
        ] {
            if !(0..=maximum).contains(&value) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{value} is outside 0 to {maximum} fen: the PBOC daily limit is a \
                         maximum, an institution may only set a lower one"
                    ),
                ));
            }
        }
        if ledger.limit_c_fen > ledger.limit_b_fen {
            return Err(Error::invalid(
                "ledger.limit_c_fen",
                "must not exceed ledger.limit_b_fen (a weaker verification gets no more room)",
            ));
        }
        if ledger.limit_d_fen > ledger.limit_c_fen {
            return Err(Error::invalid(
                "ledger.limit_d_fen",
                "must not exceed ledger.limit_c_fen (a weaker verification gets no more room)",
            ));
        }
        if !(0..=AGREED_LIMIT_CEILING_FEN).contains(&ledger.max_agreed_limit_fen) {
            return Err(Error::invalid(
                "ledger.max_agreed_limit_fen",
                format!("must be between 0 and {AGREED_LIMIT_CEILING_FEN} fen"),
            ));
        }
        if let Some(standard) = ledger.default_agreed_limit_fen {
            if !(0..=ledger.max_agreed_limit_fen).contains(&standard) {
                return Err(Error::invalid(
                    "ledger.default_agreed_limit_fen",
                    "must be between 0 and ledger.max_agreed_limit_fen",
                ));
            }
        }
        Ok(())
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
    /// Most renewals of one certificate lineage (one device's chain of renewals) in any
    /// 24 hours. Each renewal puts a superseded certificate on the CRL for its lifetime.
    pub renewals_per_day: u32,
    /// The device key algorithms enrollment accepts: `"p256"` and `"sm2"`. Unset: P-256, and
    /// SM2 too when the certs directory has an SM2 hierarchy (`sm2-issuing.pem`). Listing
    /// `sm2` without one refuses the start.
    pub key_algorithms: Option<Vec<crate::model::KeyAlgorithm>>,
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
    /// Most gRPC connections from one source address (phones behind a carrier NAT share
    /// one); a connection over it is closed at once.
    pub max_connections_per_address: usize,
    /// Most gRPC TLS handshakes in progress at once.
    pub max_handshaking: usize,
    /// Most gRPC TLS handshakes in progress from one source address (IPv6: one /64).
    pub max_handshaking_per_address: usize,
    /// A TLS handshake not finished in this many seconds is dropped with its connection.
    pub handshake_timeout_s: u32,
    /// A gRPC connection whose client sent no HTTP/2 frame but PING for this long is closed
    /// (an open health `Watch` counts as idle).
    pub idle_timeout_s: u32,
    /// The server pings an HTTP/2 connection this often, and closes it when an answer takes
    /// longer than `keepalive_timeout_s`.
    pub keepalive_interval_s: u32,
    pub keepalive_timeout_s: u32,
    /// A gRPC connection is asked to close (GOAWAY, 30 s of grace) after this many seconds;
    /// clients reconnect. 0: no limit.
    pub max_connection_age_s: u32,
    /// Most open HTTP connections (CRL, OCSP, metrics, health).
    pub http_max_connections: usize,
    /// Most HTTP connections from one source address.
    pub http_max_connections_per_address: usize,
    /// An HTTP connection on which the client sent nothing for this long is closed.
    pub http_idle_timeout_s: u32,
    /// Longest an HTTP connection stays open, busy or not.
    pub http_max_connection_age_s: u32,
    /// Most RPCs in progress on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client's further calls wait on its side.
    pub max_streams_per_connection: u32,
    /// Most payments of VerifyPayments batches being decided at once in this process; a
    /// batch waits (within its deadline) until its payments fit. At least 100, one batch.
    pub max_batched_payments: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            certs_dir: PathBuf::from("certs"),
            data_dir: PathBuf::from("data"),
            public_base_url: None,
            ca_key_passphrase_file: None,
            allow_readable_data: false,
            issuance: IssuanceConfig::default(),
            tokens: TokenConfig::default(),
            limits: LimitConfig::default(),
            revocation: RevocationConfig::default(),
            verification: VerificationConfig::default(),
            ledger: LedgerConfig::default(),
            retention: RetentionConfig::default(),
            audit: AuditConfig::default(),
            store: StoreConfig::default(),
            pkcs11: Pkcs11Config::default(),
            attestation: crate::attestation::AttestationConfig::default(),
            ca: CaConfig::default(),
        }
    }
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        IssuanceConfig {
            validity_days: 365,
            backdate_s: 300,
            renewals_per_day: 4,
            key_algorithms: None,
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
            max_connections_per_address: 256,
            max_handshaking: 256,
            max_handshaking_per_address: 8,
            handshake_timeout_s: 5,
            idle_timeout_s: 120,
            keepalive_interval_s: 30,
            keepalive_timeout_s: 10,
            max_connection_age_s: 3600,
            http_max_connections: 1024,
            http_max_connections_per_address: 64,
            http_idle_timeout_s: 15,
            http_max_connection_age_s: 300,
            max_streams_per_connection: 1024,
            max_batched_payments: 2048,
        }
    }
}

/// The most `limits.max_batched_payments` may be: a million payments in flight is minutes of
/// work for any machine payra runs on, so a larger value is a typo.
const MAX_BATCHED_PAYMENTS: usize = 1_000_000;

impl LimitConfig {
    fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("limits.max_connections", self.max_connections),
            (
                "limits.max_connections_per_address",
                self.max_connections_per_address,
            ),
            ("limits.max_handshaking", self.max_handshaking),
            (
                "limits.max_handshaking_per_address",
                self.max_handshaking_per_address,
            ),
            ("limits.http_max_connections", self.http_max_connections),
            (
                "limits.http_max_connections_per_address",
                self.http_max_connections_per_address,
            ),
            (
                "limits.max_streams_per_connection",
                self.max_streams_per_connection as usize,
            ),
        ] {
            if value == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if !(crate::ra::MAX_BATCH_PAYMENTS..=MAX_BATCHED_PAYMENTS)
            .contains(&self.max_batched_payments)
        {
            return Err(Error::invalid(
                "limits.max_batched_payments",
                format!(
                    "must be at least {} (one full VerifyPayments batch) and at most \
                     {MAX_BATCHED_PAYMENTS}",
                    crate::ra::MAX_BATCH_PAYMENTS
                ),
            ));
        }
        for (field, value) in [
            ("limits.request_timeout_s", self.request_timeout_s),
            ("limits.handshake_timeout_s", self.handshake_timeout_s),
            ("limits.keepalive_interval_s", self.keepalive_interval_s),
            ("limits.keepalive_timeout_s", self.keepalive_timeout_s),
            ("limits.http_idle_timeout_s", self.http_idle_timeout_s),
            (
                "limits.http_max_connection_age_s",
                self.http_max_connection_age_s,
            ),
        ] {
            if value == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if self.idle_timeout_s <= self.request_timeout_s {
            return Err(Error::invalid(
                "limits.idle_timeout_s",
                "must be longer than limits.request_timeout_s (an RPC in progress must not \
                 look idle)",
            ));
        }
        Ok(())
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
        self.store.validate()?;
        self.attestation.validate()?;
        self.ca.validate(&self.issuance)?;
        if self.pkcs11.enabled() {
            crate::ca::pkcs11::KeyLocation::from_config(&self.pkcs11)?;
        } else if self.pkcs11.token_label.is_some()
            || self.pkcs11.token_serial.is_some()
            || self.pkcs11.key_label.is_some()
            || self.pkcs11.key_id.is_some()
            || self.pkcs11.pin_file.is_some()
        {
            return Err(Error::invalid(
                "pkcs11",
                "names a token or key but no module: set pkcs11.module or pkcs11.uri (without \
                 them the issuing key is certs/issuing.key)",
            ));
        }
        if self.issuance.validity_days == 0 || self.issuance.validity_days > 3650 {
            return Err(Error::invalid(
                "issuance.validity_days",
                "must be between 1 and 3650",
            ));
        }
        if self
            .issuance
            .key_algorithms
            .as_ref()
            .is_some_and(|list| list.is_empty())
        {
            return Err(Error::invalid(
                "issuance.key_algorithms",
                "is empty; list \"p256\", \"sm2\" or both (or leave it unset)",
            ));
        }
        if self.issuance.renewals_per_day == 0 || self.issuance.renewals_per_day > 1000 {
            return Err(Error::invalid(
                "issuance.renewals_per_day",
                "must be between 1 and 1000",
            ));
        }
        if self.tokens.default_ttl_s == 0 || self.tokens.default_ttl_s > self.tokens.max_ttl_s {
            return Err(Error::invalid(
                "tokens.default_ttl_s",
                "must be at least 1 and at most tokens.max_ttl_s",
            ));
        }
        if self.public_base_url.is_none() && self.http_addr.ip().is_unspecified() {
            return Err(Error::invalid(
                "public_base_url",
                format!(
                    "must be set when http_addr {} listens on every address: issued \
                     certificates would carry http://{}/crl, which no relying party can reach",
                    self.http_addr, self.http_addr
                ),
            ));
        }
        if let Some(url) = &self.public_base_url {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                Error::invalid(
                    "public_base_url",
                    format!(
                        "{url:?} must start with http://: CRLs and OCSP answers are served \
                         over plain HTTP (they are signed), and an https:// URL in a \
                         certificate would need a revocation check of its own to fetch"
                    ),
                )
            })?;
            if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
                return Err(Error::invalid(
                    "public_base_url",
                    format!("{url:?} names no host"),
                ));
            }
        }
        if self.limits.max_message_bytes < 16 * 1024 {
            return Err(Error::invalid(
                "limits.max_message_bytes",
                "must be at least 16384 (a CSR may be 8 KiB)",
            ));
        }
        self.limits.validate()?;
        if self.revocation.crl_validity_s < 60 || self.revocation.ocsp_validity_s < 60 {
            return Err(Error::invalid(
                "revocation",
                "crl_validity_s and ocsp_validity_s must be at least 60",
            ));
        }
        if self.audit.head_interval_s == 0 {
            return Err(Error::invalid(
                "audit.head_interval_s",
                "must be at least 1",
            ));
        }
        let kept_s = u64::from(self.retention.expired_certificate_days) * 86_400;
        if kept_s != 0 && kept_s < u64::from(self.revocation.crl_validity_s) {
            return Err(Error::invalid(
                "retention.expired_certificate_days",
                "must keep expired certificates at least as long as revocation.crl_validity_s \
                 (a revoked certificate stays on the CRL that long after it expires), or be 0",
            ));
        }
        if self.verification.skew_s == 0 || self.verification.skew_s > 3600 {
            return Err(Error::invalid(
                "verification.skew_s",
                "must be between 1 and 3600",
            ));
        }
        let cache_bytes = self.verification.cache_bytes;
        if cache_bytes != 0 && !(MIN_CACHE_BYTES..=1 << 40).contains(&cache_bytes) {
            return Err(Error::invalid(
                "verification.cache_bytes",
                "must be 0 (no cache) or from 1 MiB (1048576) to 1 TiB (1099511627776)",
            ));
        }
        if self.ledger.utc_offset_s.abs() > 14 * 3600 {
            return Err(Error::invalid(
                "ledger.utc_offset_s",
                "must be within ±14 hours (±50400 s)",
            ));
        }
        self.ledger.validate()
    }

    /// What an operator should know before starting with this configuration (logged at start
    /// and printed by `payra config check`); none of it stops the start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        match &self.public_base_url {
            None if self.http_addr.port() == 0 => warnings.push(format!(
                "public_base_url is not set and http_addr {} asks for any free port: issued \
                 certificates name the port bound now, which changes at every start; set \
                 public_base_url",
                self.http_addr
            )),
            Some(url) => {
                if let Some(port) = loopback_port(url) {
                    if self.http_addr.port() != 0 && port != self.http_addr.port() {
                        warnings.push(format!(
                            "public_base_url {url} is a loopback URL on port {port}, but the \
                             HTTP listener is on port {}: issued certificates would point at \
                             the wrong port",
                            self.http_addr.port()
                        ));
                    }
                }
            }
            None => {}
        }
        if self.ledger.accumulation == Accumulation::PerTier {
            warnings.push(
                "ledger.accumulation = \"per_tier\": each tier has its own daily bucket, so \
                 payments without a certificate may reach B + C + D in a day; the PBOC rule \
                 nests the ceilings (docs/tiers.md)"
                    .to_string(),
            );
        }
        warnings
    }

    /// The base URL issued certificates carry: `public_base_url`, else `http://{http_addr}`.
    pub fn public_base_url(&self) -> String {
        match &self.public_base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.http_addr),
        }
    }

    /// URL of the CRL, as put into issued certificates.
    pub fn crl_url(&self) -> String {
        format!("{}/crl", self.public_base_url())
    }

    /// URL of the SM2 issuing CA's CRL, as put into SM2 certificates.
    pub fn sm2_crl_url(&self) -> String {
        format!("{}/crl/sm2", self.public_base_url())
    }

    /// URL of the OCSP responder, as put into issued certificates.
    pub fn ocsp_url(&self) -> String {
        format!("{}/ocsp", self.public_base_url())
    }
}

/// The port of an `http://` URL whose host is a loopback address or `localhost`.
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().ok()?),
                None => (host, 80),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, 80),
        },
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback.then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_algorithms_take_names_and_refuse_an_empty_or_unknown_list() {
        use crate::model::KeyAlgorithm;
        let config =
            Config::from_toml("[issuance]\nkey_algorithms = [\"sm2\", \"p256\"]").expect("both");
        assert_eq!(
            config.issuance.key_algorithms,
            Some(vec![KeyAlgorithm::Sm2, KeyAlgorithm::P256])
        );
        let err = Config::from_toml("[issuance]\nkey_algorithms = []").unwrap_err();
        assert!(err.to_string().contains("issuance.key_algorithms"), "{err}");
        let err = Config::from_toml("[issuance]\nkey_algorithms = [\"rsa\"]").unwrap_err();
        assert!(err.to_string().contains("rsa"), "{err}");
    }

    #[test]
    fn upstream_mode_needs_a_url_and_an_issuer_and_takes_no_sm2() {
        let full = "[ca]\nmode = \"upstream\"\n[ca.upstream]\nurl = \"http://ca.internal:8888\"\n\
                    issuer_file = \"/etc/payra/upstream.pem\"\n";
        let config = Config::from_toml(full).expect("upstream mode");
        assert_eq!(config.ca.mode, CaMode::Upstream);
        assert_eq!(config.ca.upstream.profile, "device");
        assert_eq!(config.ca.upstream.auth_key_env, "PAYRA_UPSTREAM_AUTH_KEY");
        for (text, named) in [
            ("[ca]\nmode = \"upstream\"\n", "ca.upstream.url"),
            (
                "[ca]\nmode = \"upstream\"\n[ca.upstream]\nurl = \"http://ca.internal\"\n",
                "ca.upstream.issuer_file",
            ),
            (
                &full.replace("http://ca.internal:8888", "ftp://ca.internal"),
                "ca.upstream.url",
            ),
            (&format!("{full}timeout_ms = 0\n"), "ca.upstream.timeout_ms"),
            (
                &format!("[issuance]\nkey_algorithms = [\"sm2\"]\n{full}"),
                "issuance.key_algorithms",
            ),
            ("[ca]\nmode = \"remote\"\n", "remote"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
        // Local mode ignores the upstream section.
        Config::from_toml("[ca.upstream]\ntimeout_ms = 0\n").expect("local mode");
    }

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
    fn fail_limits_above_the_pboc_maxima_or_out_of_order() {
        for (text, field) in [
            ("[ledger]\nlimit_c_fen = 900000\n", "ledger.limit_c_fen"),
            ("[ledger]\nlimit_b_fen = 500001\n", "ledger.limit_b_fen"),
            ("[ledger]\nlimit_d_fen = 50001\n", "ledger.limit_d_fen"),
            ("[ledger]\nlimit_d_fen = -1\n", "ledger.limit_d_fen"),
            (
                "[ledger]\nlimit_b_fen = 50000\nlimit_c_fen = 60000\n",
                "ledger.limit_c_fen",
            ),
            (
                "[ledger]\nlimit_c_fen = 40000\nlimit_d_fen = 45000\n",
                "ledger.limit_d_fen",
            ),
            (
                "[ledger]\ndefault_agreed_limit_fen = 2000000000\n",
                "ledger.default_agreed_limit_fen",
            ),
            (
                "[ledger]\nmax_agreed_limit_fen = 9223372036854775807\n",
                "ledger.max_agreed_limit_fen",
            ),
            ("[ledger]\naccumulation = \"sum\"\n", "per_tier"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn ok_lower_limits_and_per_tier_accumulation() {
        let config = Config::from_toml(
            "[ledger]\naccumulation = \"per_tier\"\nlimit_b_fen = 300000\n\
             limit_c_fen = 100000\nlimit_d_fen = 0\ndefault_agreed_limit_fen = 2000000\n",
        )
        .expect("lower limits are allowed");
        assert_eq!(config.ledger.accumulation, Accumulation::PerTier);
        assert_eq!(config.ledger.default_agreed_limit_fen, Some(2_000_000));
        assert_eq!(
            Config::default().ledger.accumulation,
            Accumulation::Nested,
            "nested is the default"
        );
    }

    #[test]
    fn public_base_url_follows_http_addr_and_refuses_https() {
        let config = Config::from_toml("http_addr = \"127.0.0.1:9090\"\n").unwrap();
        assert_eq!(config.crl_url(), "http://127.0.0.1:9090/crl");
        assert_eq!(config.ocsp_url(), "http://127.0.0.1:9090/ocsp");
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());

        let err = Config::from_toml("public_base_url = \"https://pki.example.com\"\n").unwrap_err();
        assert!(err.to_string().contains("must start with http://"), "{err}");
        let err = Config::from_toml("public_base_url = \"http://\"\n").unwrap_err();
        assert!(err.to_string().contains("public_base_url"), "{err}");

        let mismatch = Config::from_toml(
            "http_addr = \"127.0.0.1:9090\"\npublic_base_url = \"http://localhost:8080/\"\n",
        )
        .unwrap();
        assert_eq!(mismatch.crl_url(), "http://localhost:8080/crl");
        let warnings = mismatch.warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains("port 8080"),
            "{warnings:?}"
        );
        let public = Config::from_toml(
            "http_addr = \"0.0.0.0:8080\"\npublic_base_url = \"http://pki.example.com\"\n",
        )
        .unwrap();
        assert!(public.warnings().is_empty());
        let err = Config::from_toml("http_addr = \"0.0.0.0:8080\"\n").unwrap_err();
        assert!(
            err.to_string().contains("public_base_url: must be set"),
            "{err}"
        );
        let any_port = Config::from_toml("http_addr = \"127.0.0.1:0\"\n").unwrap();
        assert!(any_port.warnings()[0].contains("changes at every start"));
        assert_eq!(loopback_port("http://[::1]:81/x"), Some(81));
        assert_eq!(loopback_port("http://[::1]"), Some(80));
        assert_eq!(loopback_port("http://localhost:8080"), Some(8080));
        assert_eq!(loopback_port("http://127.0.0.1"), Some(80));
        assert_eq!(loopback_port("http://pki.example.com:81"), None);
    }

    #[test]
    fn fail_default_ttl_above_max() {
        let err = Config::from_toml("[tokens]\ndefault_ttl_s = 100\nmax_ttl_s = 50\n").unwrap_err();
        assert!(err.to_string().contains("tokens.default_ttl_s"), "{err}");
    }

    #[test]
    fn fail_batch_and_stream_limits_below_one_batch_or_zero() {
        let err = Config::from_toml("[limits]\nmax_batched_payments = 99\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("limits.max_batched_payments: must be at least 100"),
            "{err}"
        );
        assert!(Config::from_toml("[limits]\nmax_batched_payments = 100\n").is_ok());
        // A million payments in flight is minutes of work: a bound, not a tuning value.
        let err = Config::from_toml("[limits]\nmax_batched_payments = 1000001\n").unwrap_err();
        assert!(err.to_string().contains("at most 1000000"), "{err}");
        let err = Config::from_toml("[limits]\nmax_streams_per_connection = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("limits.max_streams_per_connection"),
            "{err}"
        );
    }
}
