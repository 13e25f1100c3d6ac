//! The `payra` command: the server and the operator / developer CLI in one binary.

// Outside tests, a failure is an error message and an exit code, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// jemalloc: the hot paths allocate many small, short-lived buffers (HTTP/2 frames, TLS
/// records, sled nodes). Against glibc's allocator it raised VerifyPayment by about 12 % and
/// kept the resident size with a million certificates within 15 MB (docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod cli;

use cli::human;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use payra::ca::{init_dev_pki, PkiFiles};
use payra::client::{Client, Credential, DeviceKey, ProtoDeviceInfo};
use payra::clock::SystemClock;
use payra::config::Config;

#[derive(Parser)]
#[command(
    name = "payra",
    version,
    about = "RA and issuing CA for mobile-payment device certificates"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PAYRA_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
    },
    /// Retention: purge expired nonces, tokens and old certificate records (as an operator).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Load-test a running server on this machine (loopback only) and report throughput,
    /// latency percentiles and the ratio to this binary's raw ECDSA rates.
    Bench {
        #[command(subcommand)]
        command: Option<BenchCommand>,
        #[arg(long, value_enum)]
        scenario: Option<BenchScenario>,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        #[arg(long, default_value_t = 2)]
        warmup_s: u64,
        /// Stop after this many requests (warm-up included).
        #[arg(long, default_value_t = 1_000_000)]
        max_requests: u64,
        /// Open loop (verify scenario): send this many requests per second in all, whatever
        /// the answers' pace, and count latency from each request's scheduled time.
        #[arg(long)]
        rate: Option<f64>,
        /// gRPC connections the workers share (verify scenario).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// The gRPC client: `lean` (the load generator's own HTTP/2 client, which writes the
        /// requests queued since its last write in one go) or `tonic` (the CLI's client).
        #[arg(long, value_enum, default_value = "lean")]
        client: BenchClient,
        /// Verify scenario: ask for a reservation of 1 fen with each payment (tier C, the
        /// certificate alone), so every request takes the ledger path.
        #[arg(long)]
        reserve: bool,
        /// The server's HTTP listener: the ocsp scenario's target, and where the server's CPU
        /// per request and its own latency for the scenario's RPC are read (`/metrics`).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        http: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
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
struct RevokeArgs {
    /// Serial (hex) of the certificate to revoke.
    serial: Option<String>,
    /// Revoke every live certificate of this device.
    #[arg(long)]
    device: Option<String>,
    /// Revoke every live certificate of this customer.
    #[arg(long)]
    customer: Option<String>,
    #[arg(long, value_enum, default_value_t = Reason::Unspecified)]
    reason: Reason,
    /// Report what would be revoked without changing anything (device and customer only).
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

/// RFC 5280 revocation reasons, as the CLI spells them.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Reason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl Reason {
    fn to_proto(self) -> i32 {
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
enum StatusFilter {
    Valid,
    Revoked,
    Expired,
    Superseded,
    OnHold,
    NotYetValid,
}

impl StatusFilter {
    fn to_proto(self) -> i32 {
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
enum ConfigCommand {
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
struct ServeArgs {
    /// TOML configuration file (see payra.example.toml).
    #[arg(long, env = "PAYRA_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "PAYRA_CERTS")]
    certs: Option<PathBuf>,
    #[arg(long, env = "PAYRA_DATA")]
    data: Option<PathBuf>,
    #[arg(long, env = "PAYRA_GRPC_ADDR")]
    grpc_addr: Option<std::net::SocketAddr>,
    #[arg(long, env = "PAYRA_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// Base URL of the HTTP listener as relying parties see it (CRL and OCSP URLs).
    #[arg(long, env = "PAYRA_PUBLIC_BASE_URL")]
    public_base_url: Option<String>,
    /// PostgreSQL URL, postgres://user@host:port/database (sets store.backend = "postgres").
    /// No password here: it comes from store.password_file or $PAYRA_DB_PASSWORD.
    #[arg(long, env = "PAYRA_STORE_URL")]
    store_url: Option<String>,
    /// The issuing key in a PKCS#11 token: an RFC 7512 URI (sets pkcs11.uri).
    #[arg(long, env = "PAYRA_PKCS11_URI")]
    pkcs11_uri: Option<String>,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Prove the configured issuing key works without starting the server: it matches
    /// issuing.pem and signs a test message that verifies.
    Check(ServeArgs),
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the schema migrations the PostgreSQL database lacks (safe to run again, and
    /// from several hosts at once). Run before the first `serve` and after each upgrade.
    Migrate(ServeArgs),
    /// Say which schema version the database is at and which this payra needs.
    Status(ServeArgs),
}

#[derive(Args, Clone)]
struct Connection {
    /// gRPC endpoint of the server.
    #[arg(long, env = "PAYRA_SERVER", default_value = "https://localhost:8443")]
    server: String,
    /// Directory with root.pem and the role credentials.
    #[arg(long, env = "PAYRA_CERTS", default_value = "certs")]
    certs: PathBuf,
}

#[derive(Subcommand)]
enum TokenCommand {
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
enum DeviceCommand {
    /// Generate a P-256 key, send a CSR with the token, and write device.key / device.pem.
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
    Pay {
        /// Directory written by `payra device enroll` (device.key, device.pem).
        #[arg(long)]
        device_dir: PathBuf,
        #[arg(long)]
        merchant: String,
        #[arg(long)]
        order: String,
        /// Amount in CNY, e.g. 12.34.
        #[arg(long)]
        amount: String,
        /// A factor the payment service verified: payment_pin, password, sms_otp, otp,
        /// fingerprint, face. Repeat for several.
        #[arg(long = "factor")]
        factors: Vec<String>,
        #[arg(long, value_enum, default_value_t = SceneArg::InApp)]
        scene: SceneArg,
        /// Add the amount to today's ledger if it fits.
        #[arg(long)]
        reserve: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

/// Payment scenes, as the CLI spells them.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SceneArg {
    InApp,
    DynamicBarcode,
    StaticBarcode,
    Online,
}

impl SceneArg {
    fn to_proto(self) -> i32 {
        use payra::wire::proto::Scene as P;
        (match self {
            SceneArg::InApp => P::InApp,
            SceneArg::DynamicBarcode => P::DynamicBarcode,
            SceneArg::StaticBarcode => P::StaticBarcode,
            SceneArg::Online => P::Online,
        }) as i32
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Fill a stopped server's data directory with synthetic certificate records (not in the
    /// audit chain), to measure start-up, memory and disk at scale.
    Populate {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        records: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchClient {
    Lean,
    Tonic,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchScenario {
    Verify,
    Enroll,
    /// CreateEnrollmentToken as the payment service.
    Token,
    Status,
    Ocsp,
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Run retention now, showing progress.
    Run {
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
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
enum EvidenceCommand {
    /// Show the evidence kept for a verification (as an operator).
    Show {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
enum LimitsCommand {
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
enum CertsCommand {
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
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journal gets plain text.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

type CliResult = Result<(), String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The load generator runs on one thread: its workers queue their calls, then each
    // connection writes them out together; it shares this machine with the server it measures.
    let measuring = matches!(
        cli.command,
        Command::Bench {
            scenario: Some(_),
            ..
        }
    );
    let runtime = if measuring {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into a buffer first: the generator panics on a write error, and a closed pipe
            // (`payra completions bash | head`) is not one worth a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "payra", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
                _ => Ok(()),
            }
        }
        Command::Man { out } => write_man_pages(&out),
        Command::Init {
            dir,
            force,
            pkcs11_uri: None,
        } => {
            init_dev_pki(&dir, force).map_err(|e| e.to_string())?;
            println!("wrote a development PKI to {}", dir.display());
            Ok(())
        }
        Command::Init {
            dir,
            force,
            pkcs11_uri: Some(uri),
        } => init_pkcs11(&dir, force, uri),
        Command::Ca {
            command: CaCommand::Check(args),
        } => ca_check(args),
        Command::Serve(args) => serve(args).await,
        Command::Config {
            command:
                ConfigCommand::Check {
                    file,
                    mut overrides,
                },
        } => {
            overrides.config = Some(file);
            let (config, _) = effective_config(overrides)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?
            );
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    customer,
                    ttl_s,
                    json,
                    connection,
                },
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "service")).await?;
            let token = client
                .create_enrollment_token(&customer, ttl_s)
                .await
                .map_err(status_message)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"token": token.token, "expires_at_unix_s": token.expires_at_unix_s})
                );
            } else {
                println!("{}", token.token);
                eprintln!(
                    "expires at {}",
                    human::time(token.expires_at_unix_s, human::now_s())
                );
            }
            Ok(())
        }
        Command::Device {
            command:
                DeviceCommand::Enroll {
                    token,
                    device,
                    out,
                    platform,
                    connection,
                },
        } => enroll_device(&connection, &token, &device, &out, &platform).await,
        Command::Device {
            command:
                DeviceCommand::Renew {
                    device_dir,
                    platform,
                    connection,
                },
        } => renew_device(&connection, &device_dir, platform.as_deref()).await,
        Command::Certs {
            command:
                CertsCommand::Show {
                    serial,
                    json,
                    connection,
                },
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let record = client
                .admin()
                .get_certificate(payra::wire::proto::GetCertificateRequest { serial })
                .await
                .map_err(status_message)?
                .into_inner();
            print_record(&record, json);
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::List {
                    customer,
                    device,
                    status,
                    expiring_before,
                    page_size,
                    page_token,
                    json,
                    output,
                    connection,
                },
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let mut request = payra::wire::proto::ListCertificatesRequest {
                customer_id: customer.unwrap_or_default(),
                device_id: device.unwrap_or_default(),
                status: status.map_or(0, StatusFilter::to_proto),
                expiring_before_unix_s: expiring_before.unwrap_or(0),
                page_size: page_size.unwrap_or(0),
                page_token: page_token.unwrap_or_default(),
            };
            let mut records = Vec::new();
            let next = loop {
                let page = client
                    .admin()
                    .list_certificates(request.clone())
                    .await
                    .map_err(status_message)?
                    .into_inner();
                records.extend(page.certificates);
                if page.next_page_token.is_empty() || page_size.is_some() {
                    break page.next_page_token;
                }
                request.page_token = page.next_page_token;
            };
            print_list(
                &records,
                &next,
                if json { ListOutput::Json } else { output },
            );
            Ok(())
        }
        Command::Revoke(args) => revoke(args).await,
        Command::Audit { command } => audit(command),
        Command::Db { command } => db(command),
        Command::Backup { out, connection } => backup(&out, &connection).await,
        Command::Bench {
            command: Some(BenchCommand::Populate { data, records }),
            ..
        } => populate(&data, records),
        Command::Bench {
            command: None,
            scenario: None,
            ..
        } => Err("name a --scenario, or the populate command".into()),
        Command::Bench {
            command: None,
            scenario: Some(scenario),
            concurrency,
            duration_s,
            warmup_s,
            max_requests,
            rate,
            connections,
            client,
            reserve,
            http,
            json,
            connection,
        } => {
            use payra::bench::{run as run_bench, BenchSettings, ClientKind, Scenario};
            let report = run_bench(BenchSettings {
                scenario: match scenario {
                    BenchScenario::Verify => Scenario::Verify,
                    BenchScenario::Enroll => Scenario::Enroll,
                    BenchScenario::Token => Scenario::Token,
                    BenchScenario::Status => Scenario::Status,
                    BenchScenario::Ocsp => Scenario::Ocsp,
                },
                server: connection.server.clone(),
                http,
                certs: connection.certs.clone(),
                concurrency,
                duration: std::time::Duration::from_secs(duration_s),
                warmup: std::time::Duration::from_secs(warmup_s),
                max_requests,
                rate,
                connections,
                client: match client {
                    BenchClient::Lean => ClientKind::Lean,
                    BenchClient::Tonic => ClientKind::Tonic,
                },
                progress: !json,
                reserve,
            })
            .await
            .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "scenario {:?}, concurrency {}, {:.1} s: {} requests, {} errors",
                    report.scenario,
                    report.concurrency,
                    report.seconds,
                    report.requests,
                    report.errors
                );
                println!("throughput   {:.0} per s", report.throughput_per_s);
                println!(
                    "latency      p50 {} us, p90 {} us, p99 {} us, max {} us",
                    report.latency.p50_us,
                    report.latency.p90_us,
                    report.latency.p99_us,
                    report.latency.max_us
                );
                println!(
                    "raw ECDSA    verify {:.0} per s, sign {:.0} per s (one core, ring)",
                    report.raw_verify_per_s, report.raw_sign_per_s
                );
                println!(
                    "ratio        {:.2} x raw verify, {:.2} x raw sign",
                    report.ratio_to_raw_verify, report.ratio_to_raw_sign
                );
                let per_request = |cpu: Option<f64>| {
                    cpu.map_or("unknown".to_string(), |us| format!("{us:.1} us"))
                };
                println!(
                    "CPU/request  server {}, load generator {}",
                    per_request(report.server_cpu_us_per_request),
                    per_request(report.load_generator_cpu_us_per_request)
                );
                if let Some(share) = report.load_generator_core_share {
                    let note = if share >= 0.9 {
                        " (near a full core: the generator may be what limits this run)"
                    } else {
                        ""
                    };
                    println!("generator    {:.0} % of one core{note}", share * 100.0);
                }
                if let Some(server) = &report.server_latency_at_most {
                    let bound = |us: Option<u64>| {
                        us.map_or("above the last bucket".to_string(), |us| {
                            format!("<= {us} us")
                        })
                    };
                    println!(
                        "server side  p50 {}, p90 {}, p99 {} (its histogram's buckets; {} RPCs)",
                        bound(server.p50_us),
                        bound(server.p90_us),
                        bound(server.p99_us),
                        server.requests
                    );
                }
            }
            Ok(())
        }
        Command::Retention {
            command: RetentionCommand::Run { connection },
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let mut stream = client
                .admin()
                .run_retention(payra::wire::proto::RunRetentionRequest {})
                .await
                .map_err(status_message)?
                .into_inner();
            while let Some(progress) = stream.message().await.map_err(status_message)? {
                eprint!(
                    "\rpurged: {} nonces, {} tokens, {} certificate records, {} ledger buckets, {} releases",
                    progress.nonces_purged,
                    progress.tokens_purged,
                    progress.certificates_purged,
                    progress.ledger_buckets_purged,
                    progress.releases_purged
                );
                if progress.done {
                    eprintln!();
                    println!(
                        "{}",
                        serde_json::json!({
                            "nonces_purged": progress.nonces_purged,
                            "tokens_purged": progress.tokens_purged,
                            "certificates_purged": progress.certificates_purged,
                            "ledger_buckets_purged": progress.ledger_buckets_purged,
                            "releases_purged": progress.releases_purged,
                        })
                    );
                }
            }
            Ok(())
        }
        Command::Restore { file, data, force } => restore(&file, &data, force),
        Command::IssueClient {
            role,
            name,
            out,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let key = DeviceKey::generate();
            let csr = key.csr_der(&name).map_err(|e| e.to_string())?;
            let issued = client
                .admin()
                .issue_client_certificate(payra::wire::proto::IssueClientCertificateRequest {
                    role: role.clone(),
                    name: name.clone(),
                    csr_der: csr,
                })
                .await
                .map_err(status_message)?
                .into_inner();
            let out = out.unwrap_or(connection.certs.clone());
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let key_path = out.join(format!("{name}.key"));
            write_secret(&key_path, &key.to_pkcs8_pem().map_err(|e| e.to_string())?)?;
            let mut chain = pem::encode(&pem::Pem::new("CERTIFICATE", issued.certificate_der));
            for ca in issued.chain_der {
                chain.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", ca)));
            }
            let cert_path = out.join(format!("{name}.pem"));
            std::fs::write(&cert_path, chain).map_err(|e| e.to_string())?;
            println!("{}", issued.serial);
            eprintln!(
                "issued {role} certificate {} for {name}: {} and {}",
                issued.serial,
                cert_path.display(),
                key_path.display()
            );
            Ok(())
        }
        Command::Device {
            command:
                DeviceCommand::Pay {
                    device_dir,
                    merchant,
                    order,
                    amount,
                    factors,
                    scene,
                    reserve,
                    json,
                    connection,
                },
        } => {
            pay(PayArgs {
                device_dir,
                merchant,
                order,
                amount,
                factors,
                scene,
                reserve,
                json,
                connection,
            })
            .await
        }
        Command::Evidence {
            command: EvidenceCommand::Show { id, connection },
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let evidence = client
                .admin()
                .get_evidence(payra::wire::proto::GetEvidenceRequest { evidence_id: id })
                .await
                .map_err(status_message)?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({
                    "evidence_id": evidence.evidence_id,
                    "certificate_serial": evidence.certificate_serial,
                    "customer_id": evidence.customer_id,
                    "verdict": evidence.verdict,
                    "tier": evidence.tier,
                    "categories": evidence.categories,
                    "reserved_fen": evidence.reserved_fen,
                    "day": evidence.day,
                    "released": evidence.released,
                    "recorded_at_unix_ms": evidence.recorded_at_unix_ms,
                    "intent_hex": hex::encode(&evidence.intent),
                    "signature_hex": hex::encode(&evidence.signature),
                })
            );
            Ok(())
        }
        Command::Limits {
            command:
                LimitsCommand::Show {
                    customer,
                    json,
                    connection,
                },
        } => limits_show(&connection, &customer, json).await,
        Command::Limits {
            command:
                LimitsCommand::Set {
                    customer,
                    amount,
                    connection,
                },
        } => {
            let fen = payra::client::parse_amount_fen(&amount).map_err(|e| e.to_string())?;
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            client
                .admin()
                .set_agreed_limit(payra::wire::proto::SetAgreedLimitRequest {
                    customer_id: customer.clone(),
                    daily_limit_fen: fen,
                })
                .await
                .map_err(status_message)?;
            println!(
                "tier-A daily limit of {customer} set to {}",
                human::money(fen)
            );
            Ok(())
        }
        Command::Unhold {
            serial,
            json,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let record = client
                .admin()
                .unhold_certificate(payra::wire::proto::UnholdCertificateRequest { serial })
                .await
                .map_err(status_message)?
                .into_inner();
            print_record(&record, json);
            Ok(())
        }
    }
}

/// Opens the database for the audit commands, which change nothing themselves. Opening
/// completes recovery as a start of the server would (it applies issuance-journal batches the
/// database lacks after a crash). sled allows one process at a time, so the server must be
/// stopped.
fn open_data(data: &Path) -> Result<payra::store::SledStore, String> {
    if !data.join("db").exists() {
        return Err(format!("{} holds no payra database", data.display()));
    }
    payra::store::SledStore::open(data).map_err(|e| {
        format!("{e} (is the server still running? the audit commands need it stopped)")
    })
}

/// `payra audit verify`: both chains intact; the change chain ends at its recorded head; the
/// decision log reaches the ledger checkpoint; every signed head (and the anchor, if given)
/// verifies and still matches the chains.
fn audit_verify(
    data: &Path,
    certs: &Path,
    anchor: Option<&Path>,
    allow_unsigned: bool,
) -> CliResult {
    use payra::store::audit_heads::{check_head, read_all, SignedHead};
    use payra::store::decision_log::ChainCheck;
    use payra::store::{verify_audit_log, AuditCheck, DecisionLog, Store};
    // A copy: verifying must not write to the evidence it checks.
    let store = payra::store::read_only::open_copy(data).map_err(|e| e.to_string())?;
    let entries = match verify_audit_log(&*store).map_err(|e| e.to_string())? {
        AuditCheck::Intact { entries } => entries,
        AuditCheck::Broken { seq, reason } => {
            return Err(format!("audit log broken at entry {seq}: {reason}"))
        }
    };
    let recorded = store.audit_head().map_err(|e| e.to_string())?;
    let change_hash_at = |seq: u64| -> Option<[u8; 32]> {
        let entry = store.audit_entries(seq.checked_sub(1)?, 1).ok()?.pop()?;
        (entry.body.seq == seq).then_some(())?;
        hex::decode(&entry.hash).ok()?.try_into().ok()
    };
    if recorded.seq != entries || (entries > 0 && change_hash_at(entries) != Some(recorded.hash)) {
        return Err(format!(
            "audit log broken: the recorded head is entry {}, but the chain ends at entry \
             {entries} (entries were removed or the head was rewritten)",
            recorded.seq
        ));
    }
    let mut heads = read_all(data).map_err(|e| e.to_string())?;
    let anchor = match anchor {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let line = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Some(SignedHead::parse(line).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    // The decision hashes the heads name, collected while the chain is checked.
    let wanted: std::collections::HashSet<u64> = heads
        .iter()
        .chain(anchor.iter())
        .map(|h| h.statement.decision_seq)
        .collect();
    let mut decision_hashes = std::collections::HashMap::new();
    let records = match DecisionLog::verify_with(&data.join("decisions"), &mut |seq, hash| {
        if wanted.contains(&seq) {
            decision_hashes.insert(seq, *hash);
        }
    })
    .map_err(|e| e.to_string())?
    {
        ChainCheck::Intact { records } => records,
        ChainCheck::Broken { seq, reason } => {
            return Err(format!("decision chain broken at record {seq}: {reason}"))
        }
    };
    let checkpoint = store
        .ledger_checkpoint("9999-12-31")
        .map_err(|e| e.to_string())?
        .through_seq;
    if checkpoint > records {
        return Err(format!(
            "decision chain broken: the ledger checkpoint covers record {checkpoint}, but the \
             log ends at record {records} (records were removed)"
        ));
    }
    let mut summary =
        format!("audit log intact: {entries} change entries, {records} decision records");
    if heads.is_empty() && anchor.is_none() {
        if entries + records > 0 && !allow_unsigned {
            return Err(format!(
                "{summary}, but no signed head: {} is missing or empty, so tampering could not \
                 be told from accidents. A running payra signs one every \
                 audit.head_interval_s and at shutdown; for a restored backup or a server \
                 killed before its first head, pass --allow-unsigned",
                payra::store::audit_heads::HEADS_FILE
            ));
        }
        println!("{summary}; no signed head, so only accidents, not tampering, would show");
        return Ok(());
    }
    let issuing = payra::ca::pki::read_certificate_der(&certs.join("issuing.pem"))
        .map_err(|e| format!("{e} (signed heads are checked under issuing.pem; pass --certs)"))?;
    let public_key =
        payra::ca::pki::certificate_public_key_sec1(&issuing).map_err(|e| e.to_string())?;
    let decision_hash_at = |seq: u64| decision_hashes.get(&seq).copied();
    let mut previous = (0, 0);
    for (n, head) in heads.iter().enumerate() {
        let at = (head.statement.change_seq, head.statement.decision_seq);
        if at.0 < previous.0 || at.1 < previous.1 {
            return Err(format!(
                "signed head {} of {}: it goes back from the head before it",
                n + 1,
                payra::store::audit_heads::HEADS_FILE
            ));
        }
        previous = at;
        if let Some(why) = check_head(
            head,
            &public_key,
            entries,
            records,
            &change_hash_at,
            &decision_hash_at,
        ) {
            return Err(format!(
                "signed head {} (signed at {} Unix ms) does not hold: {why}",
                n + 1,
                head.statement.signed_at_ms
            ));
        }
    }
    if let Some(anchor) = &anchor {
        if let Some(why) = check_head(
            anchor,
            &public_key,
            entries,
            records,
            &change_hash_at,
            &decision_hash_at,
        ) {
            return Err(format!("the anchor does not hold: {why}"));
        }
        let newest = heads.iter().map(|h| h.statement.signed_at_ms).max();
        if newest.is_none_or(|t| t < anchor.statement.signed_at_ms) {
            return Err(
                "the anchor is newer than every signed head in the data: signed heads were \
                 removed"
                    .into(),
            );
        }
        summary.push_str(&format!(
            "; the anchor (change {}, decision {}) holds",
            anchor.statement.change_seq, anchor.statement.decision_seq
        ));
    }
    if let Some(latest) = heads.pop() {
        let s = &latest.statement;
        summary.push_str(&format!(
            "; {} signed heads hold, the latest covers change entry {} and decision record {} \
             ({} and {} after it are not signed yet)",
            heads.len() + 1,
            s.change_seq,
            s.decision_seq,
            entries - s.change_seq,
            records - s.decision_seq
        ));
    }
    println!("{summary}");
    Ok(())
}

fn audit(command: AuditCommand) -> CliResult {
    use payra::store::{DecisionLog, Store};
    match command {
        AuditCommand::Verify {
            store_url: Some(url),
            ..
        } => audit_verify_postgres(url),
        AuditCommand::Verify {
            data,
            certs,
            anchor,
            allow_unsigned,
            store_url: None,
        } => audit_verify(&data, &certs, anchor.as_deref(), allow_unsigned),
        AuditCommand::Head { data } => {
            let heads = payra::store::audit_heads::read_all(&data).map_err(|e| e.to_string())?;
            let Some(latest) = heads.last() else {
                return Err(format!(
                    "{} holds no signed audit head yet (payra signs one every \
                     audit.head_interval_s while it runs, and at shutdown)",
                    data.display()
                ));
            };
            println!("{}", latest.to_line().map_err(|e| e.to_string())?);
            Ok(())
        }
        AuditCommand::Tail {
            data,
            lines,
            decisions: true,
        } => {
            let records = DecisionLog::tail(&data.join("decisions"), lines as usize)
                .map_err(|e| e.to_string())?;
            for (seq, record) in records {
                let line = serde_json::json!({ "seq": seq, "record": record });
                println!("{line}");
            }
            Ok(())
        }
        AuditCommand::Tail { data, lines, .. } => {
            let store = payra::store::read_only::open_copy(&data).map_err(|e| e.to_string())?;
            let head = store.audit_head().map_err(|e| e.to_string())?.seq;
            let after = head.saturating_sub(lines);
            let entries = store
                .audit_entries(after, usize::try_from(lines).unwrap_or(usize::MAX))
                .map_err(|e| e.to_string())?;
            for entry in entries {
                println!(
                    "{}",
                    serde_json::to_string(&entry).map_err(|e| e.to_string())?
                );
            }
            Ok(())
        }
    }
}

fn populate(data: &Path, records: u64) -> CliResult {
    use payra::model::{CustomerId, DeviceId, Serial};
    use payra::store::{CertificateRecord, RECORD_VERSION};
    let store = payra::store::SledStore::open(data).map_err(|e| e.to_string())?;
    // One real-looking record, varied in serial, customer and device.
    let key = DeviceKey::generate();
    let public_key_hex = hex::encode(key.secret().public_key().to_sec1_bytes());
    let certificate_b64 = CertificateRecord::encode_der(&[0x30; 620]);
    let now = payra::clock::Clock::now_s(&SystemClock);
    let started = std::time::Instant::now();
    let make = |i: u64| -> Option<CertificateRecord> {
        Some(CertificateRecord {
            version: RECORD_VERSION,
            serial: Serial::random(),
            customer_id: CustomerId::parse("customer_id", &format!("cust-{}", i / 2)).ok()?,
            device_id: DeviceId::parse("device_id", &format!("dev-{i}")).ok()?,
            device_info: Default::default(),
            subject: format!("CN={:032x},O=payra device", i),
            not_before_s: now - 300,
            not_after_s: now + 365 * 86_400,
            issued_at_s: now,
            public_key_hex: public_key_hex.clone(),
            certificate_b64: certificate_b64.clone(),
            revocation: None,
            renewed_from: None,
            superseded_by: None,
            subscriber_ref: Some(format!("{i:032x}")),
        })
    };
    let count = store
        .danger_bulk_insert_certificates((0..records).filter_map(make))
        .map_err(|e| e.to_string())?;
    println!(
        "inserted {count} synthetic certificate records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn backup(out: &Path, connection: &Connection) -> CliResult {
    use payra::store::backup::verify_backup;
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let mut stream = client
        .admin()
        .create_backup(payra::wire::proto::CreateBackupRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    // Chunks go straight to OUT.partial (mode 0600: a backup holds every record), which is
    // synced and renamed only when the stream has ended; the checksum is checked after.
    let mut partial_name = out.as_os_str().to_owned();
    partial_name.push(".partial");
    let partial = PathBuf::from(partial_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut received = 0usize;
    while let Some(chunk) = stream.message().await.map_err(status_message)? {
        file.write_all(&chunk.data)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        received += chunk.data.len();
        eprint!("\rreceived {} KiB", received / 1024);
    }
    eprintln!();
    file.sync_all()
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::rename(&partial, out).map_err(|e| format!("{}: {e}", out.display()))?;
    let (summary, _) = verify_backup(out).map_err(|e| e.to_string())?;
    println!(
        "backup written to {}: {} entries in {} trees, sha256 {}",
        out.display(),
        summary.entries,
        summary.trees,
        summary.sha256
    );
    Ok(())
}

fn restore(file: &Path, data: &Path, force: bool) -> CliResult {
    use payra::store::backup::{import_backup, verify_backup};
    use payra::store::Store;
    let (summary, backup_revoked) = verify_backup(file).map_err(|e| e.to_string())?;
    if data.join("db").exists() {
        let lost: Vec<String> = {
            let current = open_data(data)?;
            current
                .revoked_entries()
                .map_err(|e| e.to_string())?
                .into_iter()
                // Lost: revoked now but not in the backup, or revoked for good now but only
                // on hold in the backup (restoring would make it releasable again).
                .filter(|entry| match backup_revoked.get(&entry.serial) {
                    None => true,
                    Some(reason) => {
                        *reason == payra::model::RevocationReason::CertificateHold
                            && entry.revocation.reason
                                != payra::model::RevocationReason::CertificateHold
                    }
                })
                .map(|entry| {
                    format!(
                        "{} ({} at {})",
                        entry.serial,
                        entry.revocation.reason.cli_name(),
                        entry.revocation.revoked_at_s
                    )
                })
                .collect()
        };
        if !lost.is_empty() && !force {
            return Err(format!(
                "restoring would un-revoke {} certificate(s) revoked after the backup: {}{}; \
                 revoke them again after restoring, or pass --force",
                lost.len(),
                lost.iter().take(20).cloned().collect::<Vec<_>>().join(", "),
                if lost.len() > 20 { ", ..." } else { "" }
            ));
        }
        let now = payra::clock::Clock::now_s(&SystemClock);
        let aside = data.with_file_name(format!(
            "{}.before-restore-{now}",
            data.file_name().and_then(|n| n.to_str()).unwrap_or("data")
        ));
        std::fs::rename(data, &aside).map_err(|e| format!("{}: {e}", data.display()))?;
        eprintln!("current data moved to {}", aside.display());
        if !lost.is_empty() {
            eprintln!(
                "warning: {} revocation(s) lost by --force: {}",
                lost.len(),
                lost.join(", ")
            );
        }
    }
    import_backup(file, data).map_err(|e| e.to_string())?;
    println!(
        "restored {} entries in {} trees into {} (backup sha256 {})",
        summary.entries,
        summary.trees,
        data.display(),
        summary.sha256
    );
    Ok(())
}

struct PayArgs {
    device_dir: PathBuf,
    merchant: String,
    order: String,
    amount: String,
    factors: Vec<String>,
    scene: SceneArg,
    reserve: bool,
    json: bool,
    connection: Connection,
}

async fn pay(args: PayArgs) -> CliResult {
    use payra::client::{encode_intent, factor_category, random_nonce, DeviceIdentity};
    use payra::wire::proto;
    let amount_fen = payra::client::parse_amount_fen(&args.amount).map_err(|e| e.to_string())?;
    let key_pem = std::fs::read_to_string(args.device_dir.join("device.key"))
        .map_err(|e| format!("{}: {e}", args.device_dir.join("device.key").display()))?;
    let key = DeviceKey::from_pkcs8_pem(&key_pem).map_err(|e| e.to_string())?;
    let cert_pem = std::fs::read_to_string(args.device_dir.join("device.pem"))
        .map_err(|e| format!("{}: {e}", args.device_dir.join("device.pem").display()))?;
    let cert = pem::parse(&cert_pem).map_err(|e| format!("device.pem: {e}"))?;
    // `device enroll` keeps the ids beside the key (the certificate names neither); a
    // directory from before that has them in the certificate.
    let identity = match std::fs::read(args.device_dir.join("identity.json")) {
        Ok(json) => serde_json::from_slice::<DeviceIdentity>(&json)
            .map_err(|e| format!("identity.json: {e}"))?,
        Err(_) => DeviceIdentity::from_certificate(cert.contents()).map_err(|e| e.to_string())?,
    };
    let factors = args
        .factors
        .iter()
        .map(|method| {
            factor_category(method)
                .map(|category| proto::Factor {
                    category: category as i32,
                    method: method.clone(),
                })
                .ok_or_else(|| {
                    format!(
                        "unknown factor {method:?}; known: payment_pin, password, sms_otp, otp, \
                         fingerprint, face, and the other names in docs/tiers.md"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let intent = proto::PaymentIntent {
        customer_id: identity.customer_id.clone(),
        device_id: identity.device_id.clone(),
        merchant_id: args.merchant.clone(),
        order_id: args.order.clone(),
        amount_fen,
        currency: "CNY".into(),
        created_at_ms: payra::clock::Clock::now_ms(&SystemClock),
        nonce: random_nonce(),
        scene: args.scene.to_proto(),
    };
    let intent_bytes = encode_intent(&intent);
    let signature = key.sign_intent(&intent_bytes);
    let client = connect(
        &args.connection,
        Credential::role(&args.connection.certs, "service"),
    )
    .await?;
    let answer = client
        .verification()
        .verify_payment(proto::VerifyPaymentRequest {
            intent: intent_bytes,
            signature,
            certificate_serial: identity.serial.clone(),
            transaction: Some(proto::Transaction {
                merchant_id: args.merchant,
                order_id: args.order,
                amount_fen,
                currency: "CNY".into(),
            }),
            factors,
            reserve: args.reserve,
        })
        .await
        .map_err(status_message)?
        .into_inner();
    let verdict = proto::Verdict::try_from(answer.verdict)
        .map(|v| v.as_str_name().trim_start_matches("VERDICT_").to_string())
        .unwrap_or_else(|_| "UNKNOWN".into());
    let tier_letter = |tier: i32| {
        proto::Tier::try_from(tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let tier = tier_letter(answer.tier);
    let categories: Vec<String> = answer
        .categories
        .iter()
        .map(|c| {
            proto::FactorCategory::try_from(*c)
                .map(|c| {
                    c.as_str_name()
                        .trim_start_matches("FACTOR_CATEGORY_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    let limit = answer.limit.unwrap_or_default();
    let binding = tier_letter(limit.binding_tier);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "verdict": verdict,
                "reason": answer.reason,
                "tier": tier,
                "categories": categories,
                "limit_fen": limit.limit_fen,
                "used_fen": limit.used_fen,
                "remaining_fen": limit.remaining_fen,
                "fits": limit.fits,
                "reserved": limit.reserved,
                "day": limit.day,
                "binding_tier": binding,
                "evidence_id": answer.evidence_id,
            })
        );
    } else {
        println!("verdict      {verdict}");
        if !answer.reason.is_empty() {
            println!("reason       {}", answer.reason);
        }
        println!("tier         {tier}");
        println!("categories   {}", categories.join(", "));
        println!(
            "limit        {}, used {}, remaining {} (day {}, tier {binding} ceiling binds)",
            human::money(limit.limit_fen),
            human::cny(limit.used_fen),
            human::cny(limit.remaining_fen),
            limit.day
        );
        println!("fits         {}", limit.fits);
        println!("reserved     {}", limit.reserved);
        println!("evidence     {}", answer.evidence_id);
    }
    if verdict == "VERIFIED" {
        Ok(())
    } else {
        Err(format!("payment not verified: {verdict}"))
    }
}

async fn revoke(args: RevokeArgs) -> CliResult {
    use payra::wire::proto;
    let client = connect(
        &args.connection,
        Credential::role(&args.connection.certs, "operator"),
    )
    .await?;
    let mut admin = client.admin();
    let reason = args.reason.to_proto();
    let response = if let Some(serial) = args.serial {
        if args.dry_run {
            return Err("--dry-run applies to --device and --customer".into());
        }
        admin
            .revoke_certificate(proto::RevokeCertificateRequest { serial, reason })
            .await
    } else if let Some(device_id) = args.device {
        admin
            .revoke_device(proto::RevokeDeviceRequest {
                device_id,
                reason,
                dry_run: args.dry_run,
            })
            .await
    } else if let Some(customer_id) = args.customer {
        admin
            .revoke_customer(proto::RevokeCustomerRequest {
                customer_id,
                reason,
                dry_run: args.dry_run,
            })
            .await
    } else {
        return Err("name a serial, --device or --customer".into());
    };
    let response = response.map_err(status_message)?.into_inner();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "revoked_serials": response.revoked_serials,
                "revoked_at_unix_s": response.revoked_at_unix_s,
                "dry_run": response.dry_run,
                "note": response.note,
            })
        );
        return Ok(());
    }
    if !response.note.is_empty() {
        println!("{}", response.note);
    }
    let verb = if response.dry_run {
        "would revoke"
    } else {
        "revoked"
    };
    if response.revoked_serials.is_empty() {
        println!("nothing to revoke: no live certificates matched");
    }
    for serial in &response.revoked_serials {
        println!("{verb} {serial}");
    }
    Ok(())
}

fn status_name(status: i32) -> String {
    payra::wire::proto::CertificateStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CERTIFICATE_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// How `certs list` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ListOutput {
    Table,
    Json,
    Csv,
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

fn print_list(records: &[payra::wire::proto::CertificateRecord], next: &str, output: ListOutput) {
    match output {
        ListOutput::Json => {
            let items: Vec<_> = records.iter().map(record_json).collect();
            println!(
                "{}",
                serde_json::json!({"certificates": items, "next_page_token": next})
            );
            return;
        }
        ListOutput::Csv => {
            println!("serial,customer_id,device_id,status,not_before_unix_s,not_after_unix_s,revoked_at_unix_s,revocation_reason");
            for record in records {
                let reason = if record.revoked_at_unix_s != 0 {
                    reason_name(record.revocation_reason)
                } else {
                    String::new()
                };
                let row = [
                    record.serial.clone(),
                    record.customer_id.clone(),
                    record.device_id.clone(),
                    status_name(record.status),
                    record.not_before_unix_s.to_string(),
                    record.not_after_unix_s.to_string(),
                    record.revoked_at_unix_s.to_string(),
                    reason,
                ];
                let row: Vec<String> = row.iter().map(|v| csv_field(v)).collect();
                println!("{}", row.join(","));
            }
            if !next.is_empty() {
                eprintln!("next page: --page-token {next}");
            }
            return;
        }
        ListOutput::Table => {}
    }
    let now = human::now_s();
    println!(
        "{:<34} {:<20} {:<20} {:<12} NOT AFTER",
        "SERIAL", "CUSTOMER", "DEVICE", "STATUS"
    );
    for record in records {
        println!(
            "{:<34} {:<20} {:<20} {:<12} {}",
            record.serial,
            record.customer_id,
            record.device_id,
            status_name(record.status),
            human::time(record.not_after_unix_s, now)
        );
    }
    if !next.is_empty() {
        println!("next page: --page-token {next}");
    }
}

fn status_message(status: tonic::Status) -> String {
    // A transport failure's cause is in the error chain, not the message ("transport error").
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&status);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let first = if causes.is_empty() || !status.message().contains("transport error") {
        format!("{:?}: {}", status.code(), status.message())
    } else {
        format!(
            "{:?}: {}: {}",
            status.code(),
            status.message(),
            causes.join(": ")
        )
    };
    match status_hint(status.code()) {
        Some(hint) => format!("{first}\n  next: {hint}"),
        None => first,
    }
}

/// What to do about an answer with `code`, where the code alone says it.
fn status_hint(code: tonic::Code) -> Option<&'static str> {
    use tonic::Code;
    Some(match code {
        Code::PermissionDenied => {
            "this command needs another role. The credential is read from --certs DIR \
             (operator.pem and operator.key for operator commands, service.pem and service.key \
             for service ones); an operator issues one with `payra issue-client --role \
             operator|service --name NAME`"
        }
        Code::Unauthenticated => {
            "the server did not accept this client certificate: it may have expired, been \
             revoked, or come from another payra's CA. Check --certs, and have an operator \
             issue a new one with `payra issue-client`"
        }
        Code::Unavailable => {
            "the server, or the database behind it, cannot take requests now; retry in a \
             moment. Its readiness says why: curl http://HOST:8080/readyz"
        }
        Code::DeadlineExceeded => {
            "the server did not answer in time (limits.request_timeout_s); retry, and check \
             its load and its database"
        }
        Code::ResourceExhausted => "a rate or size limit was reached; wait and retry",
        _ => return None,
    })
}

async fn connect(connection: &Connection, credential: Credential) -> Result<Client, String> {
    check_credential_dates(&credential)?;
    let root = connection.certs.join("root.pem");
    if !root.exists() {
        return Err(format!(
            "{} not found: --certs (or PAYRA_CERTS) must name the directory `payra init` wrote, \
             holding root.pem and the role credentials",
            root.display()
        ));
    }
    Client::connect(&connection.server, &root, &credential)
        .await
        .map_err(|e| {
            format!(
                "{e}. Is payra running and listening there? Check --server (or PAYRA_SERVER; \
                 default https://localhost:8443) and that the server's certificate chains to \
                 {}",
                root.display()
            )
        })
}

/// Refuses a client certificate that is not valid now, before the server does: a server
/// drops such a TLS connection, and the client sees only a closed stream.
fn check_credential_dates(credential: &Credential) -> CliResult {
    let Credential::Files { certificate, .. } = credential else {
        return Ok(());
    };
    // A missing or unreadable file is reported when the credential is loaded.
    let Ok(text) = std::fs::read_to_string(certificate) else {
        return Ok(());
    };
    let Ok(block) = pem::parse(&text) else {
        return Ok(());
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(block.contents()) else {
        return Ok(());
    };
    let now_s = payra::clock::Clock::now_s(&SystemClock);
    let validity = parsed.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let next =
        "have an operator issue a new one with `payra issue-client --role ROLE --name NAME` \
                (a device renews with `payra device renew` before its certificate expires, or \
                enrolls again)";
    if now_s >= not_after {
        return Err(format!(
            "the client certificate {} expired at {} ({})\n  next: {next}",
            certificate.display(),
            payra::model::moment(not_after),
            human::relative(not_after - now_s),
        ));
    }
    if now_s < not_before {
        return Err(format!(
            "the client certificate {} is valid only from {}: check this machine's clock",
            certificate.display(),
            payra::model::moment(not_before),
        ));
    }
    Ok(())
}

/// The configuration `serve` would run with: defaults, then the file, then environment and
/// flags (clap reads each flag's `PAYRA_…` variable when the flag is absent). Also says
/// whether the certs directory was chosen explicitly.
fn effective_config(args: ServeArgs) -> Result<(Config, bool), String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let explicit_certs = args.certs.is_some() || args.config.is_some();
    if let Some(certs) = args.certs {
        config.certs_dir = certs;
    }
    if let Some(data) = args.data {
        config.data_dir = data;
    }
    if let Some(addr) = args.grpc_addr {
        config.grpc_addr = addr;
    }
    if let Some(addr) = args.http_addr {
        config.http_addr = addr;
    }
    if let Some(url) = args.public_base_url {
        config.public_base_url = Some(url);
    }
    if let Some(url) = args.store_url {
        config.store.backend = payra::config::Backend::Postgres;
        config.store.url = Some(url);
    }
    if let Some(uri) = args.pkcs11_uri {
        config.pkcs11.uri = Some(uri);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok((config, explicit_certs))
}

/// `payra init --pkcs11-uri`: the issuing key generated in the token, the certificates
/// written as for a development PKI.
fn init_pkcs11(dir: &Path, force: bool, uri: String) -> Result<(), String> {
    use payra::ca::pkcs11::KeyLocation;
    let config = payra::config::Pkcs11Config {
        uri: Some(uri),
        ..Default::default()
    };
    let location = KeyLocation::from_config(&config).map_err(|e| e.to_string())?;
    let signer = payra::ca::Pkcs11Signer::generate(&location).map_err(|e| e.to_string())?;
    payra::ca::pki::init_pki_with_issuing_signer(dir, force, std::sync::Arc::new(signer))
        .map_err(|e| e.to_string())?;
    println!(
        "generated the issuing key in the {} and wrote a development PKI to {} (no issuing.key: \
         serve with --pkcs11-uri or [pkcs11])",
        location.token,
        dir.display()
    );
    Ok(())
}

/// `payra ca check`: loads the CA as `serve` would, which signs and verifies a test message.
fn ca_check(args: ServeArgs) -> Result<(), String> {
    let (config, _) = effective_config(args)?;
    let ca = payra::server::load_ca(&config).map_err(|e| e.to_string())?;
    let key = if config.pkcs11.enabled() {
        "the key in the PKCS#11 token"
    } else {
        "issuing.key"
    };
    println!(
        "ok: {key} matches {} and signs (a test signature verified)",
        payra::ca::PkiFiles::new(&config.certs_dir)
            .issuing_cert()
            .display()
    );
    drop(ca);
    Ok(())
}

/// `payra audit verify --store-url`: the change chain and every decision chain in
/// PostgreSQL, read while the servers run.
fn audit_verify_postgres(url: String) -> CliResult {
    let config = payra::config::StoreConfig {
        backend: payra::config::Backend::Postgres,
        url: Some(url),
        ..Default::default()
    };
    let store = payra::store::PgStore::connect(&config).map_err(|e| e.to_string())?;
    let changes = match payra::store::verify_audit_log(&store).map_err(|e| e.to_string())? {
        payra::store::AuditCheck::Intact { entries } => entries,
        broken => return Err(format!("the change chain is broken: {broken:?}")),
    };
    let decisions = store
        .verify_decision_chains()
        .map_err(|e| e.to_string())?
        .map_err(|why| format!("a decision chain is broken: {why}"))?;
    println!(
        "change chain: {changes} entries intact; decision chains: {decisions} decisions intact"
    );
    println!(
        "note: signed heads are not kept in PostgreSQL yet; this proves the chains are \
         consistent, not that no one with write access to the database rewrote them"
    );
    Ok(())
}

/// `payra db migrate|status`: the PostgreSQL schema.
fn db(command: DbCommand) -> CliResult {
    let (migrate, args) = match command {
        DbCommand::Migrate(args) => (true, args),
        DbCommand::Status(args) => (false, args),
    };
    let (config, _) = effective_config(args)?;
    if config.store.backend != payra::config::Backend::Postgres {
        return Err(
            "the store is the embedded database (store.backend = \"sled\"), which needs no \
                    migration; for PostgreSQL, set [store] backend = \"postgres\" and url in \
                    the configuration, or pass --store-url"
                .into(),
        );
    }
    let store = &config.store;
    if migrate {
        let applied = payra::store::PgStore::migrate(store).map_err(|e| e.to_string())?;
        match (applied.first(), applied.last()) {
            (Some(first), Some(last)) => println!(
                "applied schema migrations {first} to {last}; the database is at version {last}"
            ),
            _ => println!(
                "the database is already at schema version {}; nothing to do",
                payra::store::postgres::SCHEMA_VERSION
            ),
        }
        return Ok(());
    }
    let state = payra::store::PgStore::inspect(store).map_err(|e| e.to_string())?;
    println!(
        "schema version {} (this payra needs {})",
        state.applied, state.known
    );
    state.require_current().map_err(|e| e.to_string())?;
    println!("up to date");
    Ok(())
}

async fn serve(args: ServeArgs) -> CliResult {
    let (config, explicit_certs) = effective_config(args)?;
    if !explicit_certs && !PkiFiles::new(&config.certs_dir).root_cert().exists() {
        init_dev_pki(&config.certs_dir, false).map_err(|e| e.to_string())?;
        tracing::warn!(
            certs = %config.certs_dir.display(),
            "created a DEVELOPMENT PKI; do not use it in production"
        );
    }
    tracing::info!(
        certs = %config.certs_dir.display(),
        data = %config.data_dir.display(),
        "try: payra token create --customer alice, then payra device enroll --token ... --device phone-1 --out phone-1"
    );
    let mut server = payra::server::start(config, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    let ended = server.ended();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("signal received: draining in-flight requests"),
        _ = ended.notified() => tracing::error!("the gRPC server stopped on its own; shutting down"),
    }
    server.trigger_shutdown();
    // Every acknowledged write is already durable, so a drain that overruns its bound loses
    // nothing; it only cuts off requests that were never answered.
    match tokio::time::timeout(std::time::Duration::from_secs(30), server.wait()).await {
        Ok(result) => result.map_err(|e| e.to_string())?,
        Err(_) => tracing::warn!("drain took longer than 30 s; exiting"),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn write_secret(path: &Path, contents: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `payra limits show`: today's ledger for one customer.
async fn limits_show(connection: &Connection, customer: &str, json: bool) -> CliResult {
    use payra::wire::proto;
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let answer = client
        .admin()
        .get_limits(proto::GetLimitsRequest {
            customer_id: customer.to_string(),
        })
        .await
        .map_err(status_message)?
        .into_inner();
    let letter = |tier: i32| {
        proto::Tier::try_from(tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_string())
            .unwrap_or_else(|_| "?".into())
    };
    if json {
        let tiers: Vec<_> = answer
            .tiers
            .iter()
            .map(|status| {
                serde_json::json!({
                    "tier": letter(status.tier),
                    "binding_tier": letter(status.binding_tier),
                    "limit_fen": status.limit_fen,
                    "used_fen": status.used_fen,
                    "remaining_fen": status.remaining_fen,
                    "ceilings": status.ceilings.iter().map(|c| serde_json::json!({
                        "tier": letter(c.tier),
                        "counts": c.counts.iter().map(|t| letter(*t)).collect::<Vec<_>>(),
                        "limit_fen": c.limit_fen,
                        "used_fen": c.used_fen,
                        "remaining_fen": c.remaining_fen,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "customer_id": answer.customer_id,
                "day": answer.day,
                "has_agreement": answer.has_agreement,
                "tiers": tiers,
            })
        );
        return Ok(());
    }
    println!(
        "customer {} on {} (ledger day){}",
        answer.customer_id,
        answer.day,
        if answer.has_agreement {
            ", agreed tier-A limit set"
        } else {
            ", no agreed limit (tier A gets the standard figure)"
        }
    );
    println!(
        "{:<6} {:<10} {:>22} {:>22} {:>22}",
        "TIER", "CEILING", "LIMIT", "USED", "LEFT"
    );
    for status in &answer.tiers {
        for ceiling in &status.ceilings {
            let counts: Vec<String> = ceiling.counts.iter().map(|t| letter(*t)).collect();
            let binds = if ceiling.tier == status.binding_tier {
                "  <- binds"
            } else {
                ""
            };
            println!(
                "{:<6} {:<10} {:>22} {:>22} {:>22}{binds}",
                letter(status.tier),
                counts.join("+"),
                human::cny(ceiling.limit_fen),
                human::cny(ceiling.used_fen),
                human::cny(ceiling.remaining_fen)
            );
        }
    }
    Ok(())
}

/// Writes `payra.1` and a page per subcommand (`payra-certs-list.1`, ...) into `out`.
fn write_man_pages(out: &Path) -> CliResult {
    use clap::CommandFactory;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut written = 0;
    let mut pending = vec![(String::from("payra"), Cli::command())];
    while let Some((name, command)) = pending.pop() {
        let command = command.name(name.clone());
        for sub in command.get_subcommands() {
            if sub.get_name() != "help" {
                pending.push((format!("{name}-{}", sub.get_name()), sub.clone()));
            }
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut page)
            .map_err(|e| e.to_string())?;
        let path = out.join(format!("{name}.1"));
        std::fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        written += 1;
    }
    eprintln!("wrote {written} man pages into {}", out.display());
    Ok(())
}

fn cli_device_info(platform: &str) -> ProtoDeviceInfo {
    ProtoDeviceInfo {
        platform: platform.to_string(),
        model: "payra-cli".to_string(),
        os_version: std::env::consts::OS.to_string(),
        app_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Writes a device directory: `device.key` (0600), `device.pem` (certificate and chain),
/// `serial` and `identity.json`. Each file is written beside its final name and renamed over
/// it, so a directory is never left with a key that does not match its certificate.
fn write_device_dir(
    out: &Path,
    key: &DeviceKey,
    issued: &payra::wire::proto::EnrollResponse,
) -> CliResult {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut chain = pem::encode(&pem::Pem::new(
        "CERTIFICATE",
        issued.certificate_der.clone(),
    ));
    for ca in &issued.chain_der {
        chain.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", ca.clone())));
    }
    let identity = payra::client::DeviceIdentity::from_enrollment(issued);
    let identity = serde_json::to_string_pretty(&identity).map_err(|e| e.to_string())?;
    let key_pem = key.to_pkcs8_pem().map_err(|e| e.to_string())?;
    let files = [
        ("device.key", key_pem, true),
        ("device.pem", chain, false),
        ("serial", format!("{}\n", issued.serial), false),
        ("identity.json", identity, false),
    ];
    for (name, contents, _) in &files {
        let staged = out.join(format!("{name}.new"));
        write_secret(&staged, contents)?;
    }
    for (name, _, secret) in &files {
        let staged = out.join(format!("{name}.new"));
        if !secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("{}: {e}", staged.display()))?;
        }
        std::fs::rename(&staged, out.join(name))
            .map_err(|e| format!("{}: {e}", out.join(name).display()))?;
    }
    Ok(())
}

async fn enroll_device(
    connection: &Connection,
    token: &str,
    device: &str,
    out: &Path,
    platform: &str,
) -> CliResult {
    let key = DeviceKey::generate();
    let csr = key.csr_der(device).map_err(|e| e.to_string())?;
    let client = connect(connection, Credential::None).await?;
    let issued = client
        .enroll(token, csr, device, cli_device_info(platform))
        .await
        .map_err(status_message)?;
    write_device_dir(out, &key, &issued)?;
    println!("{}", issued.serial);
    eprintln!(
        "enrolled {device}: serial {}, valid until {}; key and certificate in {}",
        issued.serial,
        human::time(issued.not_after_unix_s, human::now_s()),
        out.display()
    );
    Ok(())
}

/// `payra device renew`: a new key and certificate for the device in `dir`, over mutual TLS
/// with its current certificate; the directory then holds the new ones.
async fn renew_device(connection: &Connection, dir: &Path, platform: Option<&str>) -> CliResult {
    let identity_path = dir.join("identity.json");
    let device = match std::fs::read(&identity_path) {
        Ok(json) => {
            serde_json::from_slice::<payra::client::DeviceIdentity>(&json)
                .map_err(|e| format!("{}: {e}", identity_path.display()))?
                .device_id
        }
        Err(_) => String::from("device"),
    };
    let key = DeviceKey::generate();
    let csr = key.csr_der(&device).map_err(|e| e.to_string())?;
    let client = connect(connection, Credential::device(dir)).await?;
    let issued = client
        .enrollment()
        .renew(payra::wire::proto::RenewRequest {
            csr_der: csr,
            device_info: platform.map(cli_device_info),
        })
        .await
        .map_err(status_message)?
        .into_inner();
    write_device_dir(dir, &key, &issued)?;
    println!("{}", issued.serial);
    eprintln!(
        "renewed {}: new serial {}, valid until {}; the previous certificate is superseded; \
         new key and certificate in {}",
        issued.device_id,
        issued.serial,
        human::time(issued.not_after_unix_s, human::now_s()),
        dir.display()
    );
    Ok(())
}

fn reason_name(reason: i32) -> String {
    payra::wire::proto::RevocationReason::try_from(reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("REVOCATION_REASON_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The stable JSON form of a record for scripts.
fn record_json(record: &payra::wire::proto::CertificateRecord) -> serde_json::Value {
    let status = status_name(record.status);
    let reason = reason_name(record.revocation_reason);
    serde_json::json!({
            "serial": record.serial,
            "customer_id": record.customer_id,
            "device_id": record.device_id,
            "subject": record.subject,
            "status": status,
            "not_before_unix_s": record.not_before_unix_s,
            "not_after_unix_s": record.not_after_unix_s,
            "issued_at_unix_s": record.issued_at_unix_s,
            "revoked_at_unix_s": record.revoked_at_unix_s,
            "revocation_reason": if record.revoked_at_unix_s != 0 { Some(reason.clone()) } else { None },
            "renewed_from_serial": record.renewed_from_serial,
            "superseded_by_serial": record.superseded_by_serial,
    })
}

fn print_record(record: &payra::wire::proto::CertificateRecord, json: bool) {
    let status = status_name(record.status);
    let reason = reason_name(record.revocation_reason);
    if json {
        println!("{}", record_json(record));
        return;
    }
    println!("serial       {}", record.serial);
    println!("customer     {}", record.customer_id);
    println!("device       {}", record.device_id);
    println!("subject      {}", record.subject);
    println!("status       {status}");
    let now = human::now_s();
    println!(
        "not before   {}",
        human::time(record.not_before_unix_s, now)
    );
    println!("not after    {}", human::time(record.not_after_unix_s, now));
    println!("issued at    {}", human::time(record.issued_at_unix_s, now));
    if !record.subscriber_ref.is_empty() {
        println!("subscriber   {}", record.subscriber_ref);
    }
    if record.revoked_at_unix_s != 0 {
        println!(
            "revoked at   {}",
            human::time(record.revoked_at_unix_s, now)
        );
        println!("reason       {reason}");
    }
}
