//! Test harness: a real payra server on ephemeral loopback ports, with a fresh development PKI
//! and a real sled database in temp dirs, and clients for every role.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use payra::ca::init_dev_pki;
use payra::client::{Client, Credential, DeviceKey};
use payra::clock::ManualClock;
use payra::config::Config;
use payra::server::RunningServer;
use payra::wire::proto;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub config: Config,
    server: Option<RunningServer>,
}

impl TestServer {
    /// Starts a server whose clock stands at the current system time.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting `adjust` change the config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        init_dev_pki(&dir.path().join("certs"), false).expect("dev PKI");
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            certs_dir: dir.path().join("certs"),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        adjust(&mut config);
        let clock = ManualClock::at_system_time();
        let server = payra::server::start(config.clone(), Arc::new(clock.clone()))
            .await
            .expect("server starts");
        TestServer {
            dir,
            clock,
            config,
            server: Some(server),
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.config.certs_dir.clone()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").http_addr
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr().port())
    }

    /// Stops the server and starts it again on the same certs and data, on new ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the server, releasing its database.
    pub async fn stop(&mut self) {
        self.server
            .take()
            .expect("running")
            .shutdown()
            .await
            .expect("clean shutdown");
    }

    /// Starts a stopped server again with `self.config`.
    pub async fn start_again(&mut self) {
        self.server = Some(
            payra::server::start(self.config.clone(), Arc::new(self.clock.clone()))
                .await
                .expect("server restarts"),
        );
    }

    pub async fn client(&self, credential: Credential) -> Client {
        Client::connect(&self.url(), &self.certs().join("root.pem"), &credential)
            .await
            .expect("client connects")
    }

    pub async fn service(&self) -> Client {
        self.client(Credential::role(&self.certs(), "service"))
            .await
    }

    pub async fn operator(&self) -> Client {
        self.client(Credential::role(&self.certs(), "operator"))
            .await
    }

    pub async fn anonymous(&self) -> Client {
        self.client(Credential::None).await
    }

    /// A fresh token for `customer`, created as the service.
    pub async fn token(&self, customer: &str) -> String {
        self.service()
            .await
            .create_enrollment_token(customer, 0)
            .await
            .expect("token")
            .token
    }

    /// Enrolls a fresh key for `customer` / `device`; returns the key and the response.
    pub async fn enroll(&self, customer: &str, device: &str) -> (DeviceKey, proto::EnrollResponse) {
        let token = self.token(customer).await;
        let key = DeviceKey::generate();
        let response = self
            .anonymous()
            .await
            .enroll(&token, key.csr_der(device).unwrap(), device, device_info())
            .await
            .expect("enroll");
        (key, response)
    }
}

/// Runs the `payra` binary with `args` (logging at warn): success, stdout, stderr.
pub fn run_payra(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_payra"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run payra");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// [`run_payra`] against `server`, with its URL and certs directory appended (the CLI
/// authenticates with the role's credential there).
pub fn run_payra_at(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let (url, certs) = (server.url(), server.certs());
    let mut all = args.to_vec();
    all.extend(["--server", &url, "--certs", path_str(&certs)]);
    run_payra(&all)
}

pub fn device_info() -> proto::DeviceInfo {
    proto::DeviceInfo {
        platform: "android".into(),
        model: "Pixel 8".into(),
        os_version: "15".into(),
        app_version: "1.0.0".into(),
    }
}

pub fn pem(der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Runs openssl with `args`; returns (success, stdout + stderr).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Writes a device's key and certificate chain the way `payra device enroll` does; returns
/// the directory.
pub fn write_device_dir(dir: &Path, key: &DeviceKey, issued: &proto::EnrollResponse) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut chain = pem(&issued.certificate_der);
    for ca in &issued.chain_der {
        chain.push_str(&pem(ca));
    }
    std::fs::write(dir.join("device.pem"), chain).unwrap();
    std::fs::write(dir.join("device.key"), key.to_pkcs8_pem().unwrap()).unwrap();
    std::fs::write(dir.join("leaf.pem"), pem(&issued.certificate_der)).unwrap();
    let identity = payra::client::DeviceIdentity::from_enrollment(issued);
    std::fs::write(
        dir.join("identity.json"),
        serde_json::to_vec(&identity).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

impl TestServer {
    /// A client presenting the device certificate in `device_dir`.
    pub async fn device(&self, device_dir: &Path) -> Client {
        self.client(Credential::device(device_dir)).await
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr())
    }

    /// Revokes `serial` as the operator.
    pub async fn revoke(
        &self,
        serial: &str,
        reason: proto::RevocationReason,
    ) -> proto::RevokeResponse {
        self.operator()
            .await
            .revoke_certificate(serial, reason)
            .await
            .expect("revoke")
    }

    pub async fn status(&self, serial: &str) -> proto::GetCertificateStatusResponse {
        self.service()
            .await
            .certificate_status(serial)
            .await
            .expect("status")
    }
}

/// GETs `url` with a plain HTTP/1.1 request over TCP; returns (status code, headers, body).
pub async fn http_get(url: &str) -> (u16, String, Vec<u8>) {
    http_request("GET", url, &[]).await
}

pub async fn http_request(method: &str, url: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/ocsp-request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let headers = String::from_utf8_lossy(&response[..split]).into_owned();
    let code: u16 = headers[9..12].parse().unwrap();
    let mut body = response[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (code, headers, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// Publication, checked with OpenSSL: enrolled devices, the CRL, OCSP.

/// A device enrolled through the server, with its key, answer and a directory holding
/// `leaf.pem`, the chain and the key for OpenSSL.
pub struct Enrolled {
    pub key: DeviceKey,
    pub issued: proto::EnrollResponse,
    pub dir: std::path::PathBuf,
}

/// Renews over mutual TLS as the phone whose certificate is in `dir`, with a CSR of `key`.
pub async fn renew_as(
    server: &TestServer,
    dir: &Path,
    key: &DeviceKey,
    device: &str,
) -> payra::client::CallResult<proto::EnrollResponse> {
    server
        .device(dir)
        .await
        .renew(key.csr_der(device).unwrap(), None)
        .await
}

/// Renews `phone` with a fresh key; the renewed phone, ready to renew again.
pub async fn renewed(
    server: &TestServer,
    phone: &Enrolled,
    device: &str,
) -> payra::client::CallResult<Enrolled> {
    let key = DeviceKey::generate();
    let issued = renew_as(server, &phone.dir, &key, device).await?;
    let dir = write_device_dir(&server.dir.path().join(&issued.serial), &key, &issued);
    Ok(Enrolled { key, issued, dir })
}

pub async fn enrolled(server: &TestServer, customer: &str, device: &str) -> Enrolled {
    let (key, issued) = server.enroll(customer, device).await;
    let dir = write_device_dir(&server.dir.path().join(&issued.serial), &key, &issued);
    Enrolled { key, issued, dir }
}

pub fn crl_file(server: &TestServer, der: &[u8]) -> String {
    let path = server.dir.path().join(format!("crl-{}.der", rand_suffix()));
    std::fs::write(&path, der).unwrap();
    path.to_str().unwrap().to_string()
}

pub fn rand_suffix() -> String {
    payra::model::Serial::random().to_hex()
}

pub async fn fetch_crl(server: &TestServer) -> Vec<u8> {
    let (code, headers, body) = http_get(&server.http_url("/crl")).await;
    assert_eq!(code, 200);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/pkix-crl"),
        "{headers}"
    );
    body
}

/// `openssl verify -crl_check` of `leaf` with the current CRL.
pub async fn openssl_verify_with_crl(
    server: &TestServer,
    leaf: &std::path::Path,
) -> (bool, String) {
    let crl_der = fetch_crl(server).await;
    let crl_pem = server.dir.path().join(format!("crl-{}.pem", rand_suffix()));
    let (ok, text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_file(server, &crl_der),
        "-out",
        path_str(&crl_pem),
    ]);
    assert!(ok, "{text}");
    let certs = server.certs();
    openssl(&[
        "verify",
        "-crl_check",
        "-CAfile",
        path_str(&certs.join("root.pem")),
        "-untrusted",
        path_str(&certs.join("issuing.pem")),
        "-CRLfile",
        path_str(&crl_pem),
        path_str(leaf),
    ])
}

pub fn openssl_ocsp(server: &TestServer, leaf: &std::path::Path) -> (bool, String) {
    let certs = server.certs();
    openssl(&[
        "ocsp",
        "-issuer",
        path_str(&certs.join("issuing.pem")),
        "-cert",
        path_str(leaf),
        "-url",
        &server.http_url("/ocsp"),
        "-CAfile",
        path_str(&certs.join("root.pem")),
    ])
}

// The real binary, for tests that kill it or run several.

/// A `payra serve` process a test started; killed (if still running) when dropped.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `https://localhost:PORT` of its gRPC listener.
    pub url: String,
    /// `http://ADDR` of its HTTP listener.
    pub http: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `payra serve --certs CERTS --data DATA` on ephemeral loopback ports, with `args`
/// and `env` added, and waits for the log line that names its ports (text or JSON logs).
pub fn spawn_serve(
    certs: &Path,
    data: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> ServeProcess {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(env!("CARGO_BIN_EXE_payra"));
    command
        .args([
            "serve",
            "--certs",
            path_str(certs),
            "--data",
            path_str(data),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("spawn payra serve");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (grpc, http) = loop {
        let line = lines
            .next()
            .expect("server exited before serving")
            .expect("a log line");
        let field = |name: &str| -> Option<String> {
            if line.starts_with('{') {
                let entry: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
                return entry["fields"][name].as_str().map(str::to_string);
            }
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        };
        if let (Some(grpc), Some(http)) = (field("grpc_addr"), field("http_addr")) {
            break (grpc, http);
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let port = grpc.rsplit(':').next().unwrap_or_default().to_string();
    ServeProcess {
        child,
        url: format!("https://localhost:{port}"),
        http: format!("http://{http}"),
    }
}

// Payments, signed as a phone signs them.

/// An intent to pay `amount_fen` CNY fen at merchant `m-coffee`, created at `created_at_ms`,
/// in-app, with a fresh nonce.
pub fn payment_intent(
    customer: &str,
    device: &str,
    order: &str,
    amount_fen: i64,
    created_at_ms: i64,
) -> proto::PaymentIntent {
    proto::PaymentIntent {
        customer_id: customer.into(),
        device_id: device.into(),
        merchant_id: "m-coffee".into(),
        order_id: order.into(),
        amount_fen,
        currency: "CNY".into(),
        created_at_ms,
        nonce: payra::client::random_nonce(),
        scene: proto::Scene::InApp as i32,
    }
}

/// The transaction `intent` describes, as the payment service states it.
pub fn transaction_of(intent: &proto::PaymentIntent) -> proto::Transaction {
    proto::Transaction {
        merchant_id: intent.merchant_id.clone(),
        order_id: intent.order_id.clone(),
        amount_fen: intent.amount_fen,
        currency: intent.currency.clone(),
    }
}

/// A reserving QualifyTransaction request for `amount_fen` at merchant `m`.
pub fn qualify_request(
    customer: &str,
    order: &str,
    amount_fen: i64,
    factors: Vec<proto::Factor>,
    scene: proto::Scene,
) -> proto::QualifyTransactionRequest {
    proto::QualifyTransactionRequest {
        customer_id: customer.into(),
        transaction: Some(proto::Transaction {
            merchant_id: "m".into(),
            order_id: order.into(),
            amount_fen,
            currency: "CNY".into(),
        }),
        factors,
        scene: scene as i32,
        reserve: true,
    }
}

/// VerifyPayment as the payment service; panics unless payra answers.
pub async fn verify(
    server: &TestServer,
    request: proto::VerifyPaymentRequest,
) -> proto::VerifyPaymentResponse {
    server
        .service()
        .await
        .verify_payment(request)
        .await
        .expect("VerifyPayment answers")
}

/// The verdict of a VerifyPayment answer.
pub fn verdict(answer: &proto::VerifyPaymentResponse) -> proto::Verdict {
    proto::Verdict::try_from(answer.verdict).unwrap()
}

/// A VerifyPayment request for `intent`, signed with `key`, whose certificate is `serial`.
pub fn signed_payment(
    key: &DeviceKey,
    serial: &str,
    intent: &proto::PaymentIntent,
    factors: Vec<proto::Factor>,
    reserve: bool,
) -> proto::VerifyPaymentRequest {
    let bytes = payra::client::encode_intent(intent);
    proto::VerifyPaymentRequest {
        signature: key.sign_intent(&bytes),
        intent: bytes,
        certificate_serial: serial.into(),
        transaction: Some(transaction_of(intent)),
        factors,
        reserve,
    }
}

/// The Unix time now in ms, for processes whose clock the test does not hold.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// Keys and CSRs made by OpenSSL, as a phone's own crypto library would make them.

/// The `openssl` arguments that make a P-256 key (to which `-out FILE` is added).
pub const OPENSSL_P256_KEY: &[&str] = &["ecparam", "-name", "prime256v1", "-genkey", "-noout"];

/// A P-256 key made by `openssl ecparam` in `dir` (PEM, `key.pem`), and a CSR for it made by
/// `openssl req` with `subject` and the `-addext` extensions in `extensions`: the key's path
/// and the CSR's DER.
pub fn openssl_key_and_csr(dir: &Path, subject: &str, extensions: &[&str]) -> (PathBuf, Vec<u8>) {
    openssl_csr(dir, OPENSSL_P256_KEY, subject, extensions)
}

/// [`openssl_key_and_csr`] with the key made by the `openssl` arguments `genkey` (for example
/// `genpkey -algorithm RSA`).
pub fn openssl_csr(
    dir: &Path,
    genkey: &[&str],
    subject: &str,
    extensions: &[&str],
) -> (PathBuf, Vec<u8>) {
    let key = dir.join("key.pem");
    let csr = dir.join("csr.der");
    let mut args = genkey.to_vec();
    args.extend(["-out", path_str(&key)]);
    let (ok, out) = openssl(&args);
    assert!(ok, "{out}");
    let mut args = vec![
        "req",
        "-new",
        "-key",
        path_str(&key),
        "-outform",
        "DER",
        "-out",
        path_str(&csr),
        "-subj",
        subject,
    ];
    for extension in extensions {
        args.extend(["-addext", extension]);
    }
    let (ok, out) = openssl(&args);
    assert!(ok, "{out}");
    let der = std::fs::read(&csr).expect("the CSR OpenSSL wrote");
    (key, der)
}

impl TestServer {
    /// Enrolls `csr_der` for `customer` / `device` with a fresh token, as a phone would.
    pub async fn enroll_csr(
        &self,
        customer: &str,
        device: &str,
        csr_der: Vec<u8>,
    ) -> Result<proto::EnrollResponse, payra::client::ClientError> {
        let token = self.token(customer).await;
        self.anonymous()
            .await
            .enroll(&token, csr_der, device, device_info())
            .await
    }
}

/// `payra device pay` of 1.00 CNY with a PIN from the device directory `dir`: its JSON answer.
pub fn cli_pay(server: &TestServer, dir: &Path, order: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = run_payra_at(
        server,
        &[
            "device",
            "pay",
            "--device-dir",
            path_str(dir),
            "--merchant",
            "m-1",
            "--order",
            order,
            "--amount",
            "1.00",
            "--factor",
            "payment_pin",
            "--json",
        ],
    );
    assert!(ok, "{stdout} {stderr}");
    serde_json::from_str(&stdout).unwrap()
}
