//! Assembles a running payra: loads the CA, opens storage, binds the gRPC (TLS) and HTTP
//! listeners, and stops them on request.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::ca::CaMaterial;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::listener::{grpc_incoming, AdmissionLimits, HttpListener};
use crate::metrics::Metrics;
use crate::ra::{Ra, RaPolicy};
use crate::store::{PgStore, SledStore, Store};
use crate::wire::observe::ObserveLayer;
use crate::wire::proto;
use crate::wire::{AdminService, EnrollmentService, RegistrationService, VerificationService};

/// A server that is accepting connections.
pub struct RunningServer {
    /// The bound gRPC address (the real port when the config asked for port 0).
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    ended: Arc<tokio::sync::Notify>,
    grpc: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    crl_task: JoinHandle<()>,
    purge_task: JoinHandle<()>,
    /// Applies other payra processes' changes (a shared store only).
    changes_task: JoinHandle<()>,
    checkpoint_task: JoinHandle<()>,
    /// Counts certificates by status; stopped through `count_stop`, never aborted (its pass
    /// over the store runs on a blocking thread that holds the store), and a pass under way
    /// ends at its next certificate.
    count_task: JoinHandle<()>,
    count_stop: Arc<CountStop>,
    audit_head_task: JoinHandle<()>,
    upstream_task: JoinHandle<()>,
    store: Arc<dyn Store>,
    ra: Arc<Ra>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::FailedPrecondition(format!("cannot listen for {what} on {addr}: {e}")))
}

/// The gRPC listener's TLS: TLS 1.3 only (TLS 1.2 would send the client certificate, which
/// names the customer, in the clear), ALPN h2, the server certificate chain, and client
/// certificates optional (phones enroll without one) but, when presented, chained to payra's
/// root or issuing CA.
fn grpc_tls_config(ca: &CaMaterial) -> Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::FailedPrecondition(format!("TLS configuration: {what}: {e}"))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in [&ca.root_der, &ca.issuing_der] {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| bad("client CA", &e))?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("client verifier", &e))?;
    let chain = CertificateDer::pem_slice_iter(ca.server_chain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("server.pem", &e))?;
    let key = PrivateKeyDer::from_pem_slice(ca.server_key_pem.as_bytes())
        .map_err(|e| bad("server.key", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("server certificate", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The CA material: the certificates from the certs directory, the issuing key from
/// `issuing.key` or from the PKCS#11 token `[pkcs11]` names.
pub fn load_ca(config: &Config) -> Result<CaMaterial> {
    if !config.pkcs11.enabled() {
        let passphrase = ca_key_passphrase(config)?;
        return CaMaterial::load(&config.certs_dir, passphrase.as_deref());
    }
    let location = crate::ca::pkcs11::KeyLocation::from_config(&config.pkcs11)?;
    let signer = crate::ca::Pkcs11Signer::open(&location)?;
    tracing::info!(
        module = %location.module.display(),
        sessions = location.sessions,
        "issuing key in the {}",
        location.token
    );
    let mut material = CaMaterial::load_with_signer(
        &config.certs_dir,
        Arc::new(signer),
        &format!("the PKCS#11 key in the {}", location.token),
    )?;
    // The SM2 issuing key stays a file: PKCS#11 holds the P-256 key only (docs/operations.md).
    // Its passphrase is read only when there is an SM2 hierarchy to load.
    if crate::ca::PkiFiles::new(&config.certs_dir)
        .sm2_issuing_cert()
        .exists()
    {
        let passphrase = ca_key_passphrase(config)?;
        material.sm2 = crate::ca::pki::Sm2Material::load(&config.certs_dir, passphrase.as_deref())?;
    }
    Ok(material)
}

/// The issuing key's passphrase: from `ca_key_passphrase_file` (which must not be readable by
/// others), else from `PAYRA_CA_KEY_PASSPHRASE`. Never logged.
fn ca_key_passphrase(config: &Config) -> Result<Option<String>> {
    if let Some(path) = &config.ca_key_passphrase_file {
        let text = crate::ca::pki::read_private_key(path)?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
    }
    // Taken out of the environment before any thread started (see `secrets`).
    Ok(crate::secrets::env_secret("PAYRA_CA_KEY_PASSPHRASE"))
}

/// The configured store: the embedded database in the data directory, or PostgreSQL (its
/// schema checked: an unmigrated database is refused with the command to run).
fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    Ok(match config.store.backend {
        crate::config::Backend::Sled => Arc::new(SledStore::open_with(
            &config.data_dir,
            config.store.sled_compression,
        )?),
        crate::config::Backend::Postgres => {
            let store = PgStore::connect(&config.store)?;
            tracing::info!("storage: PostgreSQL");
            Arc::new(store)
        }
    })
}

/// Starts payra with `config`, reading time from `clock`.
pub async fn start(mut config: Config, clock: Arc<dyn Clock>) -> Result<RunningServer> {
    config.validate()?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(limit) = crate::listener::raise_open_file_limit() {
        tracing::debug!(limit, "open-file limit");
    }
    let grpc_listener = bind(config.grpc_addr, "gRPC").await?;
    let http_listener = bind(config.http_addr, "HTTP").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    // Certificates name the CRL and OCSP URLs of the listener as bound (port 0 picks one).
    config.http_addr = http_addr;
    let ca = Arc::new(load_ca(&config)?);
    // Everything this process writes (database, decision log, backups) is for its user only.
    crate::store::data_dir::restrict_new_files();
    crate::store::data_dir::prepare(&config.data_dir, config.allow_readable_data)?;
    let store = open_store(&config)?;
    let metrics = Arc::new(Metrics::new());
    let ra = Arc::new(Ra::new(
        store.clone(),
        ca.clone(),
        clock,
        RaPolicy::from_config(&config)?,
        metrics.clone(),
    )?);

    ra.register_bootstrap_clients(&config.certs_dir)?;

    let tls = grpc_tls_config(&ca)?;

    let max = config.limits.max_message_bytes;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl speaks v1, while Python's grpcio-reflection, older
    // grpcurl builds and several GUI clients speak v1alpha only.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::internal(format!("reflection: {e}")))?;
    for service in [
        "payra.v1.Enrollment",
        "payra.v1.Registration",
        "payra.v1.Verification",
        "payra.v1.Admin",
    ] {
        health_reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }

    let limits = &config.limits;
    let seconds = |s: u32| std::time::Duration::from_secs(u64::from(s));
    let mut builder = Server::builder()
        .timeout(seconds(limits.request_timeout_s))
        .http2_keepalive_interval(Some(seconds(limits.keepalive_interval_s)))
        .http2_keepalive_timeout(Some(seconds(limits.keepalive_timeout_s)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection));
    if limits.max_connection_age_s > 0 {
        builder = builder
            .max_connection_age(seconds(limits.max_connection_age_s))
            .max_connection_age_grace(seconds(30));
    }
    let router = builder
        .layer(
            tower::ServiceBuilder::new()
                .layer(ObserveLayer::new(metrics.clone()))
                .layer(crate::wire::auth::AuthLayer::new(ra.clone()))
                .into_inner(),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::registration_server::RegistrationServer::new(RegistrationService {
                ra: ra.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            proto::enrollment_server::EnrollmentServer::new(EnrollmentService { ra: ra.clone() })
                .max_decoding_message_size(max),
        )
        .add_service(
            proto::verification_server::VerificationServer::new(VerificationService {
                ra: ra.clone(),
                batch_admission: Arc::new(tokio::sync::Semaphore::new(limits.max_batched_payments)),
            })
            .max_decoding_message_size(max),
        )
        .add_service(
            proto::admin_server::AdminServer::new(AdminService { ra: ra.clone() })
                .max_decoding_message_size(max),
        );

    let grpc_limits = AdmissionLimits {
        listener: "grpc",
        max_connections: limits.max_connections,
        max_per_address: limits.max_connections_per_address,
        max_handshaking: limits.max_handshaking,
        max_handshaking_per_address: limits.max_handshaking_per_address,
        handshake_timeout: seconds(limits.handshake_timeout_s),
        idle_timeout: seconds(limits.idle_timeout_s),
        // Connection age is tonic's (a graceful GOAWAY), not a cut.
        max_lifetime: None,
    };
    let http_limits = AdmissionLimits {
        listener: "http",
        max_connections: limits.http_max_connections,
        max_per_address: limits.http_max_connections_per_address,
        max_handshaking: limits.http_max_connections,
        max_handshaking_per_address: limits.http_max_connections_per_address,
        handshake_timeout: seconds(limits.handshake_timeout_s),
        idle_timeout: seconds(limits.http_idle_timeout_s),
        max_lifetime: Some(seconds(limits.http_max_connection_age_s)),
    };
    let incoming = grpc_incoming(grpc_listener, tls, grpc_limits, metrics.clone());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let ended = Arc::new(tokio::sync::Notify::new());
    let grpc_ended = ended.clone();
    let grpc = tokio::spawn(async move {
        let result = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await;
        let _ = http_stop_tx.send(());
        grpc_ended.notify_one();
        result
    });
    let sync_source = store.clone();
    let log_source = ra.clone();
    let http_state = crate::http::HttpState {
        ra: ra.clone(),
        storage_syncs: Arc::new(move || sync_source.syncs() + log_source.decision_log_syncs()),
    };
    let http_listener = HttpListener::new(http_listener, http_limits, metrics.clone());
    let http = tokio::spawn(crate::http::serve(http_listener, http_state, async {
        let _ = http_stop_rx.await;
    }));
    let crl_task = tokio::spawn(keep_crl_current(ra.clone()));
    let changes_task = tokio::spawn(follow_changes(ra.clone(), store.watch_changes()));
    let purge_task = tokio::spawn(retention_loop(
        ra.clone(),
        std::time::Duration::from_secs(u64::from(config.retention.interval_s.max(60))),
    ));
    let checkpoint_task = tokio::spawn(checkpoint_loop(ra.clone()));
    let count_stop = Arc::new(CountStop::default());
    let count_task = tokio::spawn(count_loop(ra.clone(), count_stop.clone()));
    let audit_head_task = tokio::spawn(audit_head_loop(
        ra.clone(),
        std::time::Duration::from_secs(u64::from(config.audit.head_interval_s)),
    ));
    let upstream_task = tokio::spawn(upstream_loop(
        ra.clone(),
        std::time::Duration::from_secs(u64::from(config.ca.upstream.retry_interval_s)),
    ));
    if let Some(upstream) = ra.upstream() {
        tracing::info!(
            upstream = %upstream.describe(),
            status = ?upstream.status_source(),
            "RA mode: the upstream CA signs and revokes device certificates"
        );
    }
    tracing::info!(%grpc_addr, %http_addr, "payra is serving");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        shutdown: Some(shutdown_tx),
        ended,
        grpc,
        http,
        crl_task,
        purge_task,
        changes_task,
        checkpoint_task,
        count_task,
        count_stop,
        audit_head_task,
        upstream_task,
        store,
        ra,
    })
}

/// RA mode: brings revocations to the upstream CA at start, whenever this process stores
/// one, and every `interval` until the upstream has confirmed them all. Nothing in local mode.
async fn upstream_loop(ra: Arc<Ra>, interval: std::time::Duration) {
    if ra.upstream().is_none() {
        return;
    }
    loop {
        match ra.sync_upstream().await {
            Ok(sync) if sync.confirmed > 0 || sync.pending > 0 => tracing::info!(
                confirmed = sync.confirmed,
                pending = sync.pending,
                "upstream revocations"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "bringing revocations to the upstream CA failed"),
        }
        // At most one pass a second, however often revocations wake it: each reads the
        // revoked index whole.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        ra.upstream_sync_due(interval).await;
    }
}

/// How often the ledger's changes are saved (a restart replays the decisions after the last
/// save).
const LEDGER_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Saves the ledger checkpoint every [`LEDGER_CHECKPOINT_EVERY`].
async fn checkpoint_loop(ra: Arc<Ra>) {
    loop {
        tokio::time::sleep(LEDGER_CHECKPOINT_EVERY).await;
        let run = ra.clone();
        match tokio::task::spawn_blocking(move || run.save_ledger_checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "saving the ledger checkpoint failed"),
            Err(e) => tracing::error!(error = %e, "ledger checkpoint task failed"),
        }
    }
}

/// Signs the audit chains' heads every `interval` (when they moved).
async fn audit_head_loop(ra: Arc<Ra>, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let run = ra.clone();
        match tokio::task::spawn_blocking(move || run.sign_audit_head()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "signing the audit heads failed"),
            Err(e) => tracing::error!(error = %e, "audit head task failed"),
        }
    }
}

/// How often the certificates are counted by status for the metrics: a pass over every
/// certificate's summary in the store (about a second per million on sled). Replicas on one
/// PostgreSQL database take a count another made within half of it instead of counting.
const COUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Stops [`count_loop`]: the flag ends a pass under way, the notification the wait.
#[derive(Default)]
struct CountStop {
    flag: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// Counts the certificates by status at start and every [`COUNT_INTERVAL`], until `stop`.
async fn count_loop(ra: Arc<Ra>, stop: Arc<CountStop>) {
    loop {
        let (run, flag) = (ra.clone(), stop.clone());
        match tokio::task::spawn_blocking(move || {
            run.count_certificates(COUNT_INTERVAL.as_secs() as i64 / 2, &flag.flag)
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "counting certificates failed"),
            Err(e) => tracing::error!(error = %e, "counting certificates failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(COUNT_INTERVAL) => {}
            _ = stop.wake.notified() => return,
        }
    }
}

/// Runs retention (expired nonces, tokens, old certificate records, past days' ledger
/// buckets and old releases) every `interval`.
async fn retention_loop(ra: Arc<Ra>, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let run = ra.clone();
        let result = tokio::task::spawn_blocking(move || {
            run.run_retention(&crate::store::Actor::system(), &mut |_| {})
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "retention run failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}

/// Signs a new CRL soon after revocations (a burst within the coalescing delay gets one CRL)
/// and before half of the current one's validity has passed. `GET /crl` also rebuilds on
/// demand, so this task only keeps the served CRL warm.
async fn keep_crl_current(ra: Arc<Ra>) {
    const COALESCE: std::time::Duration = std::time::Duration::from_millis(250);
    let refresh = std::time::Duration::from_secs(
        u64::try_from(ra.publication().crl_refresh_s())
            .unwrap_or(3600)
            .max(1),
    );
    loop {
        let build = ra.clone();
        let sm2 = ra.publication().has_sm2();
        // Each CA's CRL is refreshed whatever happens to the other's.
        match tokio::task::spawn_blocking(move || {
            let mut results = vec![("p256", build.current_crl().map(|_| ()))];
            if sm2 {
                let algorithm = crate::model::KeyAlgorithm::Sm2;
                results.push(("sm2", build.current_crl_of(algorithm).map(|_| ())));
            }
            results
        })
        .await
        {
            Ok(results) => {
                for (ca, result) in results {
                    if let Err(e) = result {
                        tracing::error!(error = %e, ca, "CRL refresh failed");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "CRL task failed"),
        }
        tokio::select! {
            _ = ra.publication().crl_wakeup().notified() => tokio::time::sleep(COALESCE).await,
            _ = tokio::time::sleep(refresh) => {}
        }
    }
}

/// Brings this process's memory up to date with what other payra processes change in a
/// shared store, as the store reports it.
async fn follow_changes(
    ra: Arc<Ra>,
    changes: Option<tokio::sync::mpsc::UnboundedReceiver<crate::store::StoreChange>>,
) {
    let Some(mut changes) = changes else { return };
    while let Some(change) = changes.recv().await {
        // A change that cannot be applied (the database away for a moment) is not dropped:
        // everything is reloaded, once a second, until that succeeds.
        let mut pending = Some(change);
        while let Some(change) = pending.take() {
            let apply = ra.clone();
            let failed =
                match tokio::task::spawn_blocking(move || apply.apply_store_change(change)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
            if let Some(error) = failed {
                tracing::warn!(%error, "applying another process's change failed; reloading");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                pending = Some(crate::store::StoreChange::Everything);
            }
        }
    }
}

impl RunningServer {
    /// Stops accepting, lets in-flight RPCs finish, and makes storage durable.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops (after [`RunningServer::shutdown`] or a fatal error).
    pub async fn wait(self) -> Result<()> {
        let grpc = self.grpc.await;
        let http = self.http.await;
        self.crl_task.abort();
        self.purge_task.abort();
        self.changes_task.abort();
        self.checkpoint_task.abort();
        // notify_one keeps the wake-up for a loop that is counting now.
        self.count_stop
            .flag
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.count_stop.wake.notify_one();
        self.audit_head_task.abort();
        self.upstream_task.abort();
        let _ = self.crl_task.await;
        let _ = self.purge_task.await;
        let _ = self.changes_task.await;
        let _ = self.checkpoint_task.await;
        let _ = self.count_task.await;
        let _ = self.audit_head_task.await;
        let _ = self.upstream_task.await;
        let ra = self.ra.clone();
        // The last head is signed once the decision log is closed, so it covers everything.
        let decisions = tokio::task::spawn_blocking(move || {
            ra.close_decisions()
                .and_then(|()| ra.sign_audit_head().map(|_| ()))
        })
        .await
        .map_err(|e| Error::internal(format!("closing the decision log: {e}")))
        .and_then(|closed| closed);
        drop(self.ra);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| Error::internal(format!("closing storage: {e}")))??;
        decisions?;
        // Blocking work started before the stop (a CRL build, a request's storage sync) still
        // holds the store; the database closes, and its lock is released, when the last
        // holder finishes. Wait for that, bounded, so a restart in the same process finds
        // the database free.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        match grpc {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::internal(format!("gRPC server: {e}"))),
            Err(e) => return Err(Error::internal(format!("gRPC task: {e}"))),
        }
        match http {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::internal(format!("HTTP server: {e}"))),
            Err(e) => Err(Error::internal(format!("HTTP task: {e}"))),
        }
    }

    /// Completes when the gRPC server stops, whether asked to or not (a failed listener).
    pub fn ended(&self) -> Arc<tokio::sync::Notify> {
        self.ended.clone()
    }

    /// Asks the server to stop, without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passphrase_leaves_the_environment_once_read() {
        std::env::set_var("PAYRA_CA_KEY_PASSPHRASE", "correct horse");
        let read = ca_key_passphrase(&Config::default()).unwrap();
        assert_eq!(read.as_deref(), Some("correct horse"));
        assert!(std::env::var("PAYRA_CA_KEY_PASSPHRASE").is_err());
    }
}
