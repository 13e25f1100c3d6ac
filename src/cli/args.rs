//! The command line: every command, its arguments and their help text (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "payra",
    version,
    about = "RA and issuing CA for mobile-payment device certificates"
)]
pub(crate) struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PAYRA_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Print a shell completion script: `payra completions bash > /etc/bash_completion.d/payra`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (payra.1 and one per command, e.g. payra-revoke.1) into a directory.
    Man {
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
    /// Write a development PKI (root, issuing CA, server, operator and service credentials).
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Replace an existing PKI.
        #[arg(long)]
        force: bool,
        /// Generate the issuing key inside this PKCS#11 token (an RFC 7512 URI naming the
        /// module, token and key, e.g. pkcs11:token=payra;object=issuing?module-path=/usr/lib/softhsm/libsofthsm2.so).
        /// The PIN comes from the URI's pin-source file or $PAYRA_PKCS11_PIN. The root stays a
        /// file (development).
        #[arg(long, env = "PAYRA_PKCS11_URI")]
        pkcs11_uri: Option<String>,
    },
    /// Run the server. With no arguments: a development server on loopback, creating
    /// `certs/` and `data/` on first start.
    Serve(ServeArgs),
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Enrollment tokens (as the payment service).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Act as a phone: enroll a key.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Inspect certificates (as an operator).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Revoke a certificate, every certificate of a device, or of a customer (as an operator).
    Revoke(RevokeArgs),
    /// Issue a client certificate for a payment service or an operator (as an operator).
    /// Writes NAME.pem (certificate and issuing CA) and NAME.key (mode 0600).
    IssueClient {
        #[arg(long, value_parser = ["service", "operator"])]
        role: String,
        #[arg(long)]
        name: String,
        /// Directory to write into; default: the --certs directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Take a consistent online backup through the running server (as an operator).
    Backup {
        /// The backup file to write (written to FILE.partial, synced, then renamed).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Restore a backup into a data directory, with the server stopped. Refuses a corrupted
    /// file, and refuses to un-revoke: if the current data holds revocations the backup lacks,
    /// it lists them and stops unless --force. The replaced data is kept beside it.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Restore even though revocations in the current data would be lost.
        #[arg(long)]
        force: bool,
        /// Write the restored database with its pages compressed (store.sled_compression):
        /// how an existing database is compressed, or uncompressed again.
        #[arg(long)]
        compress: bool,
    },
    /// Retention: purge expired nonces, tokens and old certificate records (as an operator).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Load-test a running server on this machine (loopback only) and report throughput,
    /// latency percentiles and the ratio to this binary's raw ECDSA rates.
    #[cfg(feature = "bench")]
    Bench(BenchArgs),
    /// The PostgreSQL database: schema migrations.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The issuing CA's key.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The hash-chained audit log, read offline from a stopped server's data directory.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Evidence kept for disputes (as an operator).
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
    /// Agreed tier-A limits (as an operator).
    Limits {
        #[command(subcommand)]
        command: LimitsCommand,
    },
    /// Release a certificate from certificate-hold (as an operator).
    Unhold {
        serial: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["serial", "device", "customer"])))]
pub(crate) struct RevokeArgs {
    /// Serial (hex) of the certificate to revoke.
    pub(crate) serial: Option<String>,
    /// Revoke every live certificate of this device.
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// Revoke every live certificate of this customer.
    #[arg(long)]
    pub(crate) customer: Option<String>,
    #[arg(long, value_enum, default_value_t = Reason::Unspecified)]
    pub(crate) reason: Reason,
    /// Report what would be revoked without changing anything (device and customer only).
    #[arg(long)]
    pub(crate) dry_run: bool,
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connection: Connection,
}

/// RFC 5280 revocation reasons, as the CLI spells them.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Reason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl Reason {
    pub(crate) fn to_proto(self) -> i32 {
        use payra::wire::proto::RevocationReason as P;
        (match self {
            Reason::Unspecified => P::Unspecified,
            Reason::KeyCompromise => P::KeyCompromise,
            Reason::AffiliationChanged => P::AffiliationChanged,
            Reason::Superseded => P::Superseded,
            Reason::CessationOfOperation => P::CessationOfOperation,
            Reason::CertificateHold => P::CertificateHold,
            Reason::PrivilegeWithdrawn => P::PrivilegeWithdrawn,
        }) as i32
    }
}

/// Certificate statuses, as the CLI spells them.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum StatusFilter {
    Valid,
    Revoked,
    Expired,
    Superseded,
    OnHold,
    NotYetValid,
}

impl StatusFilter {
    pub(crate) fn to_proto(self) -> i32 {
        use payra::wire::proto::CertificateStatus as P;
        (match self {
            StatusFilter::Valid => P::Valid,
            StatusFilter::Revoked => P::Revoked,
            StatusFilter::Expired => P::Expired,
            StatusFilter::Superseded => P::Superseded,
            StatusFilter::OnHold => P::OnHold,
            StatusFilter::NotYetValid => P::NotYetValid,
        }) as i32
    }
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration (file, then
    /// environment, then flags) as JSON.
    Check {
        /// The TOML file to check.
        file: PathBuf,
        #[command(flatten)]
        overrides: ServeArgs,
    },
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// TOML configuration file (see payra.example.toml).
    #[arg(long, env = "PAYRA_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[arg(long, env = "PAYRA_CERTS")]
    pub(crate) certs: Option<PathBuf>,
    #[arg(long, env = "PAYRA_DATA")]
    pub(crate) data: Option<PathBuf>,
    #[arg(long, env = "PAYRA_GRPC_ADDR")]
    pub(crate) grpc_addr: Option<std::net::SocketAddr>,
    #[arg(long, env = "PAYRA_HTTP_ADDR")]
    pub(crate) http_addr: Option<std::net::SocketAddr>,
    /// Base URL of the HTTP listener as relying parties see it (CRL and OCSP URLs).
    #[arg(long, env = "PAYRA_PUBLIC_BASE_URL")]
    pub(crate) public_base_url: Option<String>,
    /// PostgreSQL URL, postgres://user@host:port/database (sets store.backend = "postgres").
    /// No password here: it comes from store.password_file or $PAYRA_DB_PASSWORD.
    #[arg(long, env = "PAYRA_STORE_URL")]
    pub(crate) store_url: Option<String>,
    /// The issuing key in a PKCS#11 token: an RFC 7512 URI (sets pkcs11.uri).
    #[arg(long, env = "PAYRA_PKCS11_URI")]
    pub(crate) pkcs11_uri: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Prove the configured issuing key works without starting the server: it matches
    /// issuing.pem and signs a test message that verifies.
    Check(ServeArgs),
    /// Add an SM2 hierarchy (sm2-root, sm2-issuing; SM2-with-SM3, GM/T 0015) to a PKI made
    /// before payra had one. `payra init` makes both hierarchies; this refuses to replace one.
    InitSm2 {
        #[arg(long, env = "PAYRA_CERTS", default_value = "certs")]
        certs: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum DbCommand {
    /// Apply the schema migrations the PostgreSQL database lacks (safe to run again, and
    /// from several hosts at once). Run before the first `serve` and after each upgrade.
    Migrate(ServeArgs),
    /// Say which schema version the database is at and which this payra needs.
    Status(ServeArgs),
}

#[derive(Args, Clone)]
pub(crate) struct Connection {
    /// gRPC endpoint of the server.
    #[arg(long, env = "PAYRA_SERVER", default_value = "https://localhost:8443")]
    pub(crate) server: String,
    /// Directory with root.pem and the role credentials.
    #[arg(long, env = "PAYRA_CERTS", default_value = "certs")]
    pub(crate) certs: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a one-time enrollment token for a customer (uses service.pem).
    Create {
        #[arg(long)]
        customer: String,
        /// Lifetime in seconds; 0 means the server's default.
        #[arg(long, default_value_t = 0)]
        ttl_s: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
pub(crate) enum DeviceCommand {
    /// Generate a key (P-256, or SM2 with --key-algorithm sm2), send a CSR with the token,
    /// and write device.key / device.pem.
    Enroll {
        #[arg(long)]
        token: String,
        #[arg(long)]
        device: String,
        /// Directory to write the key and certificate into.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cli")]
        platform: String,
        /// The device key: p256, or sm2 (certified by the SM2 issuing CA).
        #[arg(long, value_enum, default_value = "p256")]
        key_algorithm: BenchKeyAlgorithm,
        #[command(flatten)]
        connection: Connection,
    },
    /// Renew the device's certificate with a new key, over mutual TLS with its current one;
    /// rewrites device.key / device.pem / serial / identity.json in the directory.
    Renew {
        /// Directory written by `payra device enroll`.
        #[arg(long)]
        device_dir: PathBuf,
        /// Replace the device info on record (platform name); omitted keeps it.
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Sign a payment intent with the device key and have the payment service (service.pem)
    /// verify it: prints the verdict, tier, categories and limit status.
    Pay(PayArgs),
}

/// Payment scenes, as the CLI spells them.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum SceneArg {
    InApp,
    DynamicBarcode,
    StaticBarcode,
    Online,
}

impl SceneArg {
    pub(crate) fn to_proto(self) -> i32 {
        use payra::wire::proto::Scene as P;
        (match self {
            SceneArg::InApp => P::InApp,
            SceneArg::DynamicBarcode => P::DynamicBarcode,
            SceneArg::StaticBarcode => P::StaticBarcode,
            SceneArg::Online => P::Online,
        }) as i32
    }
}

#[cfg(feature = "bench")]
#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Fill a stopped server's sled data directory, or a PostgreSQL database, with synthetic
    /// certificate records (not in the audit chain), to measure start-up, memory and disk at
    /// scale; record i's key is derived from i, so `payra bench --population` can pay as it.
    Populate {
        /// The sled data directory (the server stopped).
        #[arg(
            long,
            required_unless_present = "store_url",
            conflicts_with = "store_url"
        )]
        data: Option<PathBuf>,
        /// A PostgreSQL database instead, postgres://user@host:port/database (the password
        /// from $PAYRA_DB_PASSWORD); written with COPY, servers may run.
        #[arg(long)]
        store_url: Option<String>,
        #[arg(long)]
        records: u64,
        /// sled: create the database with its pages compressed (store.sled_compression).
        #[arg(long, conflicts_with = "store_url")]
        compress: bool,
    },
    /// Where a stopped server's sled database spends its bytes: each tree's entries, key
    /// and value bytes, and the database's size on disk.
    Sizes {
        #[arg(long)]
        data: PathBuf,
    },
}

#[cfg(feature = "bench")]
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BenchClient {
    Lean,
    Tonic,
}

#[cfg(feature = "bench")]
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BenchScenario {
    Verify,
    Enroll,
    /// CreateEnrollmentToken as the payment service.
    Token,
    Status,
    Ocsp,
}

#[derive(Subcommand)]
pub(crate) enum RetentionCommand {
    /// Run retention now, showing progress.
    Run {
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check both chains, every signed head, the recorded heads and the ledger checkpoint;
    /// exit non-zero naming the first problem. Reads a copy: the data is never written.
    Verify {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// The PKI directory: signed heads are checked under its issuing.pem.
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
        /// A head exported earlier with `payra audit head` and kept outside this machine:
        /// proves that nothing up to it changed since, even if the head file was cut.
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// Accept chains with no signed head (a restored backup, or a server killed before
        /// its first head): only accidents, not tampering, can then be told.
        #[arg(long)]
        allow_unsigned: bool,
        /// Check the chains in this PostgreSQL database instead, while the servers run
        /// (the password comes from $PAYRA_DB_PASSWORD).
        #[arg(long, env = "PAYRA_STORE_URL")]
        store_url: Option<String>,
    },
    /// Print the latest signed head of the audit chains (one JSON line), to keep outside
    /// this machine and give back to `audit verify --anchor`.
    Head {
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Show the latest entries, oldest first, one JSON object per line.
    Tail {
        #[arg(long, default_value = "data")]
        data: PathBuf,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
        /// Show the decision chain (verifications, qualifications, releases) instead of the
        /// change chain.
        #[arg(long)]
        decisions: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum EvidenceCommand {
    /// Show the evidence kept for a verification (as an operator).
    Show {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
pub(crate) enum LimitsCommand {
    /// Set a customer's agreed tier-A daily limit, in CNY (as an operator).
    Set {
        #[arg(long)]
        customer: String,
        /// Daily limit in CNY, e.g. 20000.00.
        #[arg(long)]
        amount: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show where a customer stands today: each tier's ceilings, what counts toward them,
    /// what is left, and the one that binds (as an operator).
    Show {
        #[arg(long)]
        customer: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
pub(crate) enum CertsCommand {
    /// List certificates, filtered; follows page tokens unless --page-size is given.
    List {
        #[arg(long)]
        customer: Option<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only certificates whose notAfter is before this Unix time (seconds).
        #[arg(long)]
        expiring_before: Option<i64>,
        /// Show one page of this size and print the next page token.
        #[arg(long)]
        page_size: Option<i32>,
        #[arg(long)]
        page_token: Option<String>,
        /// Only certificates whose key attestation is of this class (hardware: a TEE or
        /// Apple's Secure Enclave).
        #[arg(long, value_parser = ["none", "software", "hardware", "strongbox"])]
        attestation: Option<String>,
        /// Only certificates whose attestation chain held the certificate with this serial
        /// (hex): what an attestation key listed later vouched for.
        #[arg(long)]
        attested_by: Option<String>,
        /// Same as --output json.
        #[arg(long, conflicts_with = "output")]
        json: bool,
        /// table (for people), json (the records as the API gives them) or csv (a header
        /// row, then one row per certificate).
        #[arg(long, value_enum, default_value_t = ListOutput::Table)]
        output: ListOutput,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one certificate's record (uses operator.pem).
    Show {
        serial: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// RA mode: revocations the upstream CA has not confirmed yet, with the attempts made
    /// (uses operator.pem). Exits 0 when none are pending, 1 when some are.
    UpstreamPending {
        /// Send them to the upstream now, before listing (after an outage is over).
        #[arg(long)]
        retry: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

// `payra device pay`: a payment signed with the device's key, verified as the service.
#[derive(Args)]
pub(crate) struct PayArgs {
    /// Directory written by `payra device enroll` (device.key, device.pem).
    #[arg(long)]
    pub(crate) device_dir: PathBuf,
    #[arg(long)]
    pub(crate) merchant: String,
    #[arg(long)]
    pub(crate) order: String,
    /// Amount in CNY, e.g. 12.34.
    #[arg(long)]
    pub(crate) amount: String,
    /// A factor the payment service verified: payment_pin, password, sms_otp, otp,
    /// fingerprint, face. Repeat for several.
    #[arg(long = "factor")]
    pub(crate) factors: Vec<String>,
    #[arg(long, value_enum, default_value_t = SceneArg::InApp)]
    pub(crate) scene: SceneArg,
    /// Add the amount to today's ledger if it fits.
    #[arg(long)]
    pub(crate) reserve: bool,
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connection: Connection,
}

/// `--key-algorithm` of `payra bench` and `payra device enroll`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BenchKeyAlgorithm {
    P256,
    Sm2,
}

/// How `certs list` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ListOutput {
    Table,
    Json,
    Csv,
}

#[cfg(feature = "bench")]
/// `payra bench`: a scenario against a running server, or a subcommand.
#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    pub(crate) command: Option<BenchCommand>,
    #[arg(long, value_enum)]
    pub(crate) scenario: Option<BenchScenario>,
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_s: u64,
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup_s: u64,
    /// Stop after this many requests (warm-up included).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) max_requests: u64,
    /// Open loop (verify scenario): send this many requests per second in all, whatever
    /// the answers' pace, and count latency from each request's scheduled time.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// gRPC connections the workers share (verify scenario).
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// The gRPC client: `lean` (the load generator's own HTTP/2 client, which writes the
    /// requests queued since its last write in one go) or `tonic` (the CLI's client).
    #[arg(long, value_enum, default_value = "lean")]
    pub(crate) client: BenchClient,
    /// Verify scenario: ask for a reservation of 1 fen with each payment (tier C, the
    /// certificate alone), so every request takes the ledger path.
    #[arg(long)]
    pub(crate) reserve: bool,
    /// The devices' key algorithm (verify and enroll): p256, or sm2 from the SM2 issuing CA;
    /// the raw rates reported are of the same algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    pub(crate) key_algorithm: BenchKeyAlgorithm,
    /// Verify and status scenarios: pay as (or ask about) the first N devices `payra bench
    /// populate` wrote, instead of enrolling a device per worker.
    #[arg(long)]
    pub(crate) population: Option<u64>,
    /// With --population: how the devices are chosen; 0 is uniform, otherwise the exponent
    /// of a Zipf law (1.0: the classic skew, a few devices pay most).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) skew: f64,
    /// Verify scenario: payments per call. 1 sends VerifyPayment; 2 to 100 send
    /// VerifyPayments, and throughput and CPU are then per payment, latency per call.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// The server's HTTP listener: the ocsp scenario's target, and where the server's CPU
    /// per request and its own latency for the scenario's RPC are read (`/metrics`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) http: String,
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connection: Connection,
}
