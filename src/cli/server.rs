//! `payra serve`, `payra config check`, `payra db`, `payra ca`, `payra init --pkcs11-uri`, `payra man`.

use std::path::Path;
use std::sync::Arc;

use payra::ca::{init_dev_pki, PkiFiles};
use payra::clock::SystemClock;
use payra::config::Config;

use super::args::*;
use crate::CliResult;

/// The configuration `serve` would run with: defaults, then the file, then environment and
/// flags (clap reads each flag's `PAYRA_…` variable when the flag is absent). Also says
/// whether the certs directory was chosen explicitly.
pub(crate) fn effective_config(args: ServeArgs) -> Result<(Config, bool), String> {
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
pub(crate) fn init_pkcs11(dir: &Path, force: bool, uri: String) -> Result<(), String> {
    use payra::ca::pkcs11::KeyLocation;
    let config = payra::config::Pkcs11Config {
        uri: Some(uri),
        ..Default::default()
    };
    let location = KeyLocation::from_config(&config).map_err(|e| e.to_string())?;
    // Refused before the key is made: a refusal after it would leave a key in the token.
    payra::ca::pki::refuse_existing_pki(dir, force).map_err(|e| e.to_string())?;
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
pub(crate) fn ca_check(args: ServeArgs) -> Result<(), String> {
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
    if ca.sm2.is_some() {
        println!(
            "ok: {} matches {} and signs SM2-with-SM3 (a test signature verified)",
            payra::ca::PkiFiles::new(&config.certs_dir)
                .sm2_issuing_key()
                .display(),
            payra::ca::PkiFiles::new(&config.certs_dir)
                .sm2_issuing_cert()
                .display()
        );
    }
    drop(ca);
    Ok(())
}

/// `payra ca init-sm2`: an SM2 hierarchy beside an existing P-256 one.
pub(crate) fn ca_init_sm2(certs: &std::path::Path) -> Result<(), String> {
    payra::ca::pki::init_sm2_hierarchy(certs).map_err(|e| e.to_string())?;
    let files = payra::ca::PkiFiles::new(certs);
    println!(
        "wrote {} and {} (keys mode 0600); restart payra to issue SM2 certificates",
        files.sm2_root_cert().display(),
        files.sm2_issuing_cert().display()
    );
    Ok(())
}

/// `payra db migrate|status`: the PostgreSQL schema.
pub(crate) fn db(command: DbCommand) -> CliResult {
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

pub(crate) async fn serve(args: ServeArgs) -> CliResult {
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

pub(crate) async fn shutdown_signal() {
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

/// Writes `payra.1` and a page per subcommand (`payra-certs-list.1`, ...) into `out`.
pub(crate) fn write_man_pages(out: &Path) -> CliResult {
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

/// `payra config check FILE`: the effective configuration, its warnings, and whether it is valid.
pub(crate) fn config_check(file: std::path::PathBuf, mut overrides: ServeArgs) -> CliResult {
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

/// `payra completions SHELL`.
pub(crate) fn write_completions(shell: clap_complete::Shell) -> CliResult {
    use clap::CommandFactory;
    use std::io::Write;
    // Into a buffer first: the generator panics on a write error, and a closed pipe
    // (`payra completions bash | head`) is not one worth a panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "payra", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
        _ => Ok(()),
    }
}
