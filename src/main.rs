//! The `payra` command: the server and the operator / developer CLI in one binary.

// Outside tests, a failure is an error message and an exit code, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// jemalloc: the hot paths allocate many small, short-lived buffers (HTTP/2 frames, TLS
/// records, sled nodes). Against glibc's allocator it raised VerifyPayment by about 12 % and
/// kept the resident size with a million certificates within 15 MB (docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod cli;

use cli::args::*;
use cli::audit::*;
use cli::backup::*;
#[cfg(feature = "bench")]
use cli::bench;
use cli::certificates::*;
use cli::connection::*;
use cli::server::*;
use cli::{certificates, devices, evidence, limits, retention, tokens};
use std::process::ExitCode;

use clap::Parser;

use payra::ca::init_dev_pki;

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
    // Before any thread: secrets leave the environment while nothing else can read it.
    payra::secrets::take_from_environment(&payra::secrets::ENVIRONMENT_SECRETS);
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The load generator runs on one thread: its workers queue their calls, then each
    // connection writes them out together; it shares this machine with the server it measures.
    #[cfg(feature = "bench")]
    let measuring = matches!(
        cli.command,
        Command::Bench(BenchArgs {
            scenario: Some(_),
            ..
        })
    );
    #[cfg(not(feature = "bench"))]
    let measuring = false;
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
        Command::Completions { shell } => write_completions(shell),
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
        Command::Ca {
            command: CaCommand::InitSm2 { certs },
        } => ca_init_sm2(&certs),
        Command::Serve(args) => serve(args).await,
        Command::Config {
            command: ConfigCommand::Check { file, overrides },
        } => config_check(file, overrides),
        Command::Revoke(args) => revoke(args).await,
        Command::Audit { command } => audit(command),
        Command::Db { command } => db(command),
        Command::Backup { out, connection } => backup(&out, &connection).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench::bench(args).await,
        Command::Restore {
            file,
            data,
            force,
            compress,
        } => restore(&file, &data, force, compress),
        Command::IssueClient {
            role,
            name,
            out,
            connection,
        } => issue_client(&role, &name, out, &connection).await,
        Command::Unhold {
            serial,
            json,
            connection,
        } => unhold(serial, json, &connection).await,
        Command::Token { command } => tokens::token(command).await,
        Command::Device { command } => devices::device(command).await,
        Command::Certs { command } => certificates::certs(command).await,
        Command::Retention { command } => retention::retention(command).await,
        Command::Evidence { command } => evidence::evidence(command).await,
        Command::Limits { command } => limits::limits(command).await,
    }
}
