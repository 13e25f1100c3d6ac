//! RA mode against a real upstream CA: CFSSL (`cfssl serve`, Debian's golang-cfssl) with a
//! throwaway two-level CA made by OpenSSL, an authenticated signing profile and its
//! certificate database. Enrollment, renewal, payments and revocation go end to end through
//! it; faults (down, slow, garbage, a certificate outside the profile, a wrong key) are
//! answered UNAVAILABLE and leave nothing half-written.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use payra::client::DeviceKey;
use payra::clock::Clock;
use payra::config::{CaMode, Config};
use payra::wire::proto;

/// Where the upstream's signing profile says its CRL and OCSP responder are.
const UPSTREAM_CRL: &str = "http://crl.licensed-ca.example/device.crl";
const UPSTREAM_OCSP: &str = "http://ocsp.licensed-ca.example";

/// The usages of a signing profile that matches payra's device profile.
const DEVICE_USAGES: &[&str] = &["digital signature", "client auth"];

/// A CFSSL server with a throwaway CA (root and issuing CA), its signing profile `device`
/// (HMAC-authenticated) and a SQLite certificate database; killed when dropped.
struct Cfssl {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Cfssl {
    /// Makes the CA and starts `cfssl serve` with a `device` profile of `usages`.
    fn start(usages: &[&str]) -> Cfssl {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let (ok, out) = openssl(args);
            assert!(ok, "openssl {args:?}: {out}");
        };
        // `openssl req` with a new P-256 key in `key`, then `rest`.
        let req_with_new_key = |key: &str, rest: &[&str]| {
            let key = d.join(key);
            let mut args = vec![
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                path_str(&key),
            ];
            args.extend_from_slice(rest);
            run(&args);
        };
        req_with_new_key(
            "root.key",
            &[
                "-x509",
                "-out",
                path_str(&d.join("root.pem")),
                "-subj",
                "/C=CN/O=Licensed CA/CN=Licensed Root",
                "-days",
                "3650",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        req_with_new_key(
            "issuing.key",
            &[
                "-new",
                "-out",
                path_str(&d.join("issuing.csr")),
                "-subj",
                "/C=CN/O=Licensed CA/CN=Licensed Device CA",
            ],
        );
        std::fs::write(
            d.join("issuing.ext"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\n\
             keyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            path_str(&d.join("issuing.csr")),
            "-CA",
            path_str(&d.join("root.pem")),
            "-CAkey",
            path_str(&d.join("root.key")),
            "-set_serial",
            "2",
            "-days",
            "1825",
            "-out",
            path_str(&d.join("issuing.pem")),
            "-extfile",
            path_str(&d.join("issuing.ext")),
        ]);
        // CFSSL's certificate database (its SQLite schema), made with Python's sqlite3.
        sqlite(
            &d.join("certdb.db"),
            "CREATE TABLE certificates (serial_number blob NOT NULL, \
             authority_key_identifier blob NOT NULL, ca_label blob, status blob NOT NULL, \
             reason int, expiry timestamp, revoked_at timestamp, pem blob NOT NULL, \
             PRIMARY KEY(serial_number, authority_key_identifier)); \
             CREATE TABLE ocsp_responses (serial_number blob NOT NULL, \
             authority_key_identifier blob NOT NULL, body blob NOT NULL, expiry timestamp, \
             PRIMARY KEY(serial_number, authority_key_identifier));",
        );
        std::fs::write(
            d.join("db.json"),
            serde_json::json!({
                "driver": "sqlite3",
                "data_source": d.join("certdb.db"),
            })
            .to_string(),
        )
        .unwrap();
        let key: [u8; 16] = rand::random();
        let key_file = d.join("auth.key");
        std::fs::write(&key_file, hex::encode(key)).unwrap();
        set_mode(&key_file, 0o600);
        let mut cfssl = Cfssl {
            dir,
            port: free_port(),
            child: None,
        };
        cfssl.configure(usages, &hex::encode(key));
        cfssl.start_again();
        cfssl
    }

    /// Writes the signing configuration: profile `device` with `usages`, one year, keyed by
    /// `key_hex`.
    fn configure(&self, usages: &[&str], key_hex: &str) {
        std::fs::write(
            self.dir.path().join("config.json"),
            serde_json::json!({
                "signing": {
                    "default": { "expiry": "168h" },
                    "profiles": {
                        "device": {
                            "usages": usages,
                            "expiry": "8760h",
                            "auth_key": "payra",
                            "crl_url": UPSTREAM_CRL,
                            "ocsp_url": UPSTREAM_OCSP,
                        }
                    }
                },
                "auth_keys": { "payra": { "type": "standard", "key": key_hex } }
            })
            .to_string(),
        )
        .unwrap();
    }

    /// Starts `cfssl serve` on this server's port and waits for it to listen.
    fn start_again(&mut self) {
        let d = self.dir.path();
        let mut child = Command::new("cfssl")
            .args([
                "serve",
                "-address",
                "127.0.0.1",
                "-port",
                &self.port.to_string(),
                "-ca",
                path_str(&d.join("issuing.pem")),
                "-ca-key",
                path_str(&d.join("issuing.key")),
                "-config",
                path_str(&d.join("config.json")),
                "-db-config",
                path_str(&d.join("db.json")),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cfssl (Debian package golang-cfssl) runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines
                .next()
                .expect("cfssl exited before listening")
                .unwrap();
            if line.contains("Now listening on") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The certificate database's status and reason code for `serial` (hex), if it holds it.
    fn db_status(&self, serial_hex: &str) -> Option<(String, i64)> {
        let decimal = payra::ca::upstream::cfssl::decimal(&hex::decode(serial_hex).unwrap());
        let out = sqlite(
            &self.path("certdb.db"),
            &format!("SELECT status, reason FROM certificates WHERE serial_number = '{decimal}'"),
        );
        let line = out.lines().next()?;
        let (status, reason) = line.split_once('|')?;
        Some((status.to_string(), reason.parse().unwrap()))
    }

    /// How many certificates CFSSL has issued.
    fn db_count(&self) -> usize {
        sqlite(&self.path("certdb.db"), "SELECT count(*) FROM certificates")
            .trim()
            .parse()
            .unwrap()
    }

    /// payra's configuration for this upstream.
    fn payra_config(&self, config: &mut Config) {
        config.ca.mode = CaMode::Upstream;
        let upstream = &mut config.ca.upstream;
        upstream.url = Some(self.url());
        upstream.issuer_file = Some(self.path("issuing.pem"));
        upstream.auth_key_file = Some(self.path("auth.key"));
        upstream.timeout_ms = 5_000;
        upstream.crl_url = Some(UPSTREAM_CRL.into());
        upstream.ocsp_url = Some(UPSTREAM_OCSP.into());
    }
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs SQL on a SQLite database with Python's sqlite3: a SELECT's rows as `a|b` lines, or
/// a script of statements.
fn sqlite(db: &Path, sql: &str) -> String {
    let script = "import sqlite3, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  if sys.argv[2].startswith('SELECT'):\n    \
                      [print('|'.join(str(v) for v in r)) for r in c.execute(sys.argv[2])]\n\
                  else:\n    \
                      c.executescript(sys.argv[2])\n\
                  c.commit()\n";
    let out = Command::new("python3")
        .args(["-c", script, path_str(db), sql])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "sqlite: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A loopback port nothing listens on (right now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fake upstream on a loopback port: each connection's request is read, then answered by
/// `answer` (`None`: held open, never answered). Runs until the test ends.
fn fake_upstream(answer: Option<&'static [u8]>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
            match answer {
                Some(bytes) => {
                    let _ = stream.write_all(bytes);
                }
                None => held.push(stream),
            }
        }
    });
    url
}

/// An HTTP 200 answer carrying `body`.
fn http_answer(body: &str) -> &'static [u8] {
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(answer.into_boxed_str()).as_bytes()
}

/// Enrolls a fresh key with `token`; the answer or the gRPC status.
async fn enroll_with(
    server: &TestServer,
    token: &str,
    device: &str,
) -> Result<(DeviceKey, proto::EnrollResponse), payra::client::ClientError> {
    let key = DeviceKey::generate();
    let csr = key.csr_der(device).unwrap();
    server
        .anonymous()
        .await
        .enroll(token, csr, device, device_info())
        .await
        .map(|issued| (key, issued))
}

/// Enrolls a fresh key with `token` and expects it refused with `code`, the message saying
/// `says`: the refusal.
async fn enrollment_refused(
    server: &TestServer,
    token: &str,
    code: tonic::Code,
    says: &str,
) -> payra::client::ClientError {
    let refused = enroll_with(server, token, "phone-1")
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), code, "{refused:?}");
    assert!(
        refused.message().contains(says),
        "{says}: {}",
        refused.message()
    );
    refused
}

/// Renews certificate `serial` to `new_key` without a client certificate, by a proof that
/// `signer` signs.
async fn renew_by_proof(
    server: &TestServer,
    signer: &DeviceKey,
    serial: &str,
    new_key: &DeviceKey,
) -> Result<proto::EnrollResponse, payra::client::ClientError> {
    let csr = new_key.csr_der("phone-1").unwrap();
    let proof = signer
        .renewal_proof(serial, &csr, server.clock.now_s())
        .unwrap();
    server
        .anonymous()
        .await
        .renew_with_proof(csr, None, proof)
        .await
}

/// Enrolls through `enroll_on`, stops the upstream and revokes the certificate through
/// `revoke_on` (keyCompromise): a payment through `enroll_on` is refused at once, and after a
/// pass the revocation is pending there. The certificate, and what is pending.
async fn revoked_while_the_upstream_is_down(
    cfssl: &mut Cfssl,
    enroll_on: &TestServer,
    revoke_on: &TestServer,
) -> (proto::EnrollResponse, Vec<proto::UpstreamRevocation>) {
    let (key, issued) = enroll_with(enroll_on, &enroll_on.token("acme").await, "phone-1")
        .await
        .unwrap();
    cfssl.stop();
    revoke_on
        .revoke(&issued.serial, proto::RevocationReason::KeyCompromise)
        .await;
    assert_eq!(
        pay(enroll_on, &key, &issued.serial, "acme", "phone-1").await,
        proto::Verdict::CertificateRevoked
    );
    let pending = pending_after_retry(enroll_on).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].serial, issued.serial);
    (issued, pending)
}

/// What is still pending upstream after one more pass.
async fn pending_after_retry(server: &TestServer) -> Vec<proto::UpstreamRevocation> {
    server
        .operator()
        .await
        .list_upstream_revocations(true)
        .await
        .expect("ListUpstreamRevocations")
        .pending
}

/// A payment by `key`'s certificate `serial`, verified: its verdict.
async fn pay(
    server: &TestServer,
    key: &DeviceKey,
    serial: &str,
    customer: &str,
    device: &str,
) -> proto::Verdict {
    let intent = payment_intent(
        customer,
        device,
        &rand_suffix(),
        1_200,
        server.clock.now_ms(),
    );
    verdict(&verify(server, signed_payment(key, serial, &intent, vec![], false)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_enroll_pay_renew_and_are_revoked_through_a_cfssl_upstream() {
    let cfssl = Cfssl::start(DEVICE_USAGES);
    let server = TestServer::start_with(|config| cfssl.payra_config(config)).await;

    let token = server.token("acme").await;
    let (key, issued) = enroll_with(&server, &token, "phone-1")
        .await
        .expect("enroll");
    // The upstream issued it: its issuer, its chain, and its database holds it.
    assert_eq!(
        issued.chain_der,
        vec![
            pem::parse(std::fs::read_to_string(cfssl.path("issuing.pem")).unwrap())
                .unwrap()
                .into_contents()
        ]
    );
    assert_eq!(cfssl.db_status(&issued.serial), Some(("good".into(), 0)));
    let leaf = server.dir.path().join("leaf.pem");
    std::fs::write(&leaf, pem(&issued.certificate_der)).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&cfssl.path("root.pem")),
        "-untrusted",
        path_str(&cfssl.path("issuing.pem")),
        "-purpose",
        "sslclient",
        path_str(&leaf),
    ]);
    assert!(
        ok,
        "OpenSSL verifies the chain to the upstream's root: {out}"
    );
    let (_, text) = openssl(&[
        "x509",
        "-in",
        path_str(&leaf),
        "-noout",
        "-subject",
        "-issuer",
    ]);
    assert!(
        text.contains("O = payra device") && text.contains("Licensed Device CA"),
        "{text}"
    );
    let record = server
        .operator()
        .await
        .certificate(&issued.serial)
        .await
        .unwrap();
    assert!(record.issued_upstream);
    assert_eq!(record.customer_id, "acme");

    // Payments verify against it, as against payra's own certificates.
    assert_eq!(
        pay(&server, &key, &issued.serial, "acme", "phone-1").await,
        proto::Verdict::Verified
    );

    // Renewal by proof (payra's TLS listener does not take the upstream's certificate); the
    // superseded certificate is revoked upstream.
    let new_key = DeviceKey::generate();
    let renewed = renew_by_proof(&server, &key, &issued.serial, &new_key)
        .await
        .expect("renewal by proof");
    assert_ne!(renewed.serial, issued.serial);
    assert_eq!(cfssl.db_status(&renewed.serial), Some(("good".into(), 0)));
    assert_eq!(pending_after_retry(&server).await, vec![]);
    assert_eq!(
        cfssl.db_status(&issued.serial),
        Some(("revoked".into(), 4)),
        "superseded"
    );
    assert_eq!(
        pay(&server, &key, &issued.serial, "acme", "phone-1").await,
        proto::Verdict::CertificateRevoked
    );

    // A proof from another key does not renew.
    let stranger = DeviceKey::generate();
    let refused = renew_by_proof(&server, &stranger, &renewed.serial, &stranger)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("ECDSA P-256"),
        "{}",
        refused.message()
    );

    // An operator revokes: effective at once in payra, confirmed upstream.
    server
        .revoke(&renewed.serial, proto::RevocationReason::KeyCompromise)
        .await;
    assert_eq!(
        pay(&server, &new_key, &renewed.serial, "acme", "phone-1").await,
        proto::Verdict::CertificateRevoked
    );
    assert_eq!(pending_after_retry(&server).await, vec![]);
    assert_eq!(
        cfssl.db_status(&renewed.serial),
        Some(("revoked".into(), 1)),
        "keyCompromise"
    );

    // payra's own CRL lists none of the upstream's certificates (they are on the upstream's).
    let crl = fetch_crl(&server).await;
    let (_, crl_text) = openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_file(&server, &crl),
        "-noout",
        "-text",
    ]);
    for serial in [&issued.serial, &renewed.serial] {
        assert!(
            !crl_text.to_lowercase().contains(&serial.to_lowercase()),
            "{crl_text}"
        );
    }

    // The upstream cannot release a hold, so payra does not offer to.
    let (hold_key, held) = enroll_with(&server, &server.token("acme").await, "phone-2")
        .await
        .unwrap();
    server
        .revoke(&held.serial, proto::RevocationReason::CertificateHold)
        .await;
    let unhold = server
        .operator()
        .await
        .unhold_certificate(&held.serial)
        .await
        .unwrap_err();
    assert_eq!(unhold.code(), tonic::Code::FailedPrecondition, "{unhold:?}");
    assert!(
        unhold.message().contains("cannot release a hold"),
        "{}",
        unhold.message()
    );
    assert_eq!(
        pay(&server, &hold_key, &held.serial, "acme", "phone-2").await,
        proto::Verdict::CertificateRevoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_fails_enrollment_cleanly_and_the_token_works_when_it_is_back() {
    let mut cfssl = Cfssl::start(DEVICE_USAGES);
    let server = TestServer::start_with(|config| cfssl.payra_config(config)).await;
    let token = server.token("acme").await;
    cfssl.stop();

    let down = enrollment_refused(
        &server,
        &token,
        tonic::Code::Unavailable,
        "the certificate authority did not issue the certificate (it could not be reached",
    )
    .await;
    let message = down.message();
    assert!(
        !message.contains(&cfssl.url()) && !message.contains("cfssl"),
        "the phone is not told where the upstream is: {message}"
    );
    assert!(message.contains("token is still usable"), "{message}");
    let listed = server
        .operator()
        .await
        .list_certificates(proto::ListCertificatesRequest {
            customer_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(listed.certificates.is_empty(), "nothing stored");

    cfssl.start_again();
    let (_, issued) = enroll_with(&server, &token, "phone-1")
        .await
        .expect("the same token");
    assert_eq!(cfssl.db_status(&issued.serial), Some(("good".into(), 0)));
    let again = enroll_with(&server, &token, "phone-1")
        .await
        .err()
        .expect("refused");
    assert_eq!(
        again.code(),
        tonic::Code::FailedPrecondition,
        "used once: {again:?}"
    );
    assert_eq!(
        cfssl.db_count(),
        1,
        "the used token never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_or_one_answering_garbage_is_unavailable_and_nothing_is_stored() {
    let issuer = Cfssl::start(DEVICE_USAGES);
    for (answer, expected) in [
        (None, "it did not answer in time"),
        (
            Some(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"[..]),
            "it could not be reached or gave no usable answer",
        ),
        (
            Some(http_answer(
                r#"{"success":true,"result":{"certificate":"not PEM"},"errors":[]}"#,
            )),
            "it could not be reached or gave no usable answer",
        ),
        (
            Some(&b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..]),
            "it could not be reached or gave no usable answer",
        ),
    ] {
        let url = fake_upstream(answer);
        let server = TestServer::start_with(|config| {
            issuer.payra_config(config);
            config.ca.upstream.url = Some(url.clone());
            config.ca.upstream.timeout_ms = 300;
        })
        .await;
        let token = server.token("acme").await;
        enrollment_refused(&server, &token, tonic::Code::Unavailable, expected).await;
        let listed = server
            .operator()
            .await
            .list_certificates(proto::ListCertificatesRequest::default())
            .await
            .unwrap();
        assert!(listed.certificates.is_empty(), "nothing stored");
        // The server keeps serving: the token is still there to use.
        let again = enroll_with(&server, &token, "phone-1").await.err().expect("refused");
        assert_eq!(again.code(), tonic::Code::Unavailable, "not consumed: {again:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_outside_the_profile_is_refused_unstored_and_revoked_upstream() {
    // A signing profile for servers, not the device profile payra decided.
    let mut cfssl = Cfssl::start(&["digital signature", "server auth"]);
    let server = TestServer::start_with(|config| cfssl.payra_config(config)).await;
    let token = server.token("acme").await;

    enrollment_refused(
        &server,
        &token,
        tonic::Code::FailedPrecondition,
        "outside payra's profile",
    )
    .await;
    let listed = server
        .operator()
        .await
        .list_certificates(proto::ListCertificatesRequest::default())
        .await
        .unwrap();
    assert!(listed.certificates.is_empty(), "not stored");
    // The upstream issued it, so payra has it revoked there.
    assert_eq!(cfssl.db_count(), 1);
    assert_eq!(pending_after_retry(&server).await, vec![]);
    let serial = sqlite(
        &cfssl.path("certdb.db"),
        "SELECT serial_number, status, reason FROM certificates",
    );
    assert!(
        serial.trim().ends_with("|revoked|5"),
        "cessationOfOperation: {serial}"
    );

    // With the profile put right, the same token enrolls.
    let key = std::fs::read_to_string(cfssl.path("auth.key")).unwrap();
    cfssl.stop();
    cfssl.configure(DEVICE_USAGES, key.trim());
    cfssl.start_again();
    enroll_with(&server, &token, "phone-1")
        .await
        .expect("enrolls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hmac_key_is_refused_by_the_upstream_and_named() {
    let cfssl = Cfssl::start(DEVICE_USAGES);
    let wrong = cfssl.path("wrong.key");
    std::fs::write(&wrong, hex::encode(rand::random::<[u8; 16]>())).unwrap();
    set_mode(&wrong, 0o600);
    let server = TestServer::start_with(|config| {
        cfssl.payra_config(config);
        config.ca.upstream.auth_key_file = Some(wrong.clone());
    })
    .await;
    let token = server.token("acme").await;
    enrollment_refused(
        &server,
        &token,
        tonic::Code::Unavailable,
        "(it refused the request)",
    )
    .await;
    assert_eq!(cfssl.db_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_the_upstream_is_down_is_effective_at_once_and_retried_until_confirmed()
{
    let mut cfssl = Cfssl::start(DEVICE_USAGES);
    let mut server = TestServer::start_with(|config| cfssl.payra_config(config)).await;
    let (issued, pending) = revoked_while_the_upstream_is_down(&mut cfssl, &server, &server).await;
    assert_eq!(
        pending[0].reason,
        proto::RevocationReason::KeyCompromise as i32
    );
    assert!(pending[0].attempts >= 1);
    assert!(
        pending[0].last_error.contains("connecting to"),
        "{}",
        pending[0].last_error
    );

    // Operators see it from the CLI, which exits non-zero while anything is pending.
    let (ok, out, err) = run_payra_at(&server, &["certs", "upstream-pending"]);
    assert!(!ok, "{out} {err}");
    assert!(
        out.contains(&issued.serial) && out.contains("key-compromise"),
        "{out}"
    );
    assert!(err.contains("1 revocation(s) not confirmed"), "{err}");

    // A restart keeps it pending: nothing about it was only in memory.
    server.restart().await;
    let pending = pending_after_retry(&server).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(cfssl.db_status(&issued.serial), Some(("good".into(), 0)));

    cfssl.start_again();
    assert_eq!(pending_after_retry(&server).await, vec![]);
    assert_eq!(cfssl.db_status(&issued.serial), Some(("revoked".into(), 1)));
    let (ok, out, err) = run_payra_at(&server, &["certs", "upstream-pending", "--json"]);
    assert!(ok, "{out} {err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["pending"], serde_json::json!([]));
    assert_eq!(listed["upstream"], format!("cfssl at {}", cfssl.url()));
    assert_eq!(listed["crl_url"], UPSTREAM_CRL);
    assert_eq!(listed["ocsp_url"], UPSTREAM_OCSP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_by_proof_is_refused_for_payra_issued_p256_certificates() {
    let server = TestServer::start().await;
    let (key, issued) = server.enroll("acme", "phone-1").await;
    let refused = renew_by_proof(&server, &key, &issued.serial, &DeviceKey::generate())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("over mutual TLS"),
        "{}",
        refused.message()
    );
    // In local mode there is nothing upstream.
    let listed = server
        .operator()
        .await
        .list_upstream_revocations(true)
        .await
        .unwrap();
    assert!(listed.upstream.is_empty() && listed.pending.is_empty());
}

/// Two replicas on one PostgreSQL database share the upstream's backlog: a revocation made
/// through one while the upstream is down is pending on both, and confirmed for both by
/// either. Skipped, and said so, without a test cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgresql_share_the_upstream_backlog() {
    let Some(store) = payra::store::postgres::testing::fresh_database(
        "upstream::replicas_on_postgresql_share_the_upstream_backlog",
    ) else {
        return;
    };
    payra::store::PgStore::migrate(&store).expect("migrate");
    let mut cfssl = Cfssl::start(DEVICE_USAGES);
    let first_store = store.clone();
    let first = TestServer::start_with(|config| {
        cfssl.payra_config(config);
        config.store = first_store;
    })
    .await;
    let certs = first.certs();
    let second = TestServer::start_with(|config| {
        cfssl.payra_config(config);
        config.store = store;
        config.certs_dir = certs;
    })
    .await;

    let (issued, _) = revoked_while_the_upstream_is_down(&mut cfssl, &first, &second).await;

    cfssl.start_again();
    assert_eq!(pending_after_retry(&second).await, vec![]);
    let listed = first
        .operator()
        .await
        .list_upstream_revocations(false)
        .await
        .unwrap();
    assert_eq!(listed.pending, vec![], "confirmed for both");
    assert_eq!(cfssl.db_status(&issued.serial), Some(("revoked".into(), 1)));
}

/// A CSR the upstream would read more from than its key (a subject beyond a CN, requested
/// extensions) is refused before the upstream sees it; an OpenSSL CSR with a CN only enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_the_upstream_would_copy_from_is_refused_before_it_is_sent() {
    let cfssl = Cfssl::start(DEVICE_USAGES);
    let server = TestServer::start_with(|config| cfssl.payra_config(config)).await;
    let work = tempfile::tempdir().unwrap();
    for (subject, extensions, named) in [
        (
            "/C=CN/OU=payments/CN=phone",
            &[][..],
            "holds more than a CN",
        ),
        (
            "/CN=phone",
            &["subjectAltName=email:a@example.com"][..],
            "requests extensions",
        ),
        (
            "/CN=phone",
            &["basicConstraints=critical,CA:TRUE"][..],
            "requests extensions",
        ),
    ] {
        let (_, csr) = openssl_key_and_csr(work.path(), subject, extensions);
        let refused = server
            .enroll_csr("acme", "phone-1", csr)
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(named),
            "{named}: {}",
            refused.message()
        );
    }
    assert_eq!(cfssl.db_count(), 0, "the upstream saw none of them");
    let (_, csr) = openssl_key_and_csr(work.path(), "/CN=phone", &[]);
    let issued = server
        .enroll_csr("acme", "phone-1", csr)
        .await
        .expect("a CN only");
    assert_eq!(cfssl.db_status(&issued.serial), Some(("good".into(), 0)));
}

/// A loopback proxy to `upstream` that holds each answer to a signing request for `delay`
/// before passing it on (revocations pass at once): an upstream that issues, but late.
fn delaying_proxy(upstream: u16, delay: std::time::Duration) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { break };
            std::thread::spawn(move || {
                let Some(request) = read_http_message(&mut client) else {
                    return;
                };
                let signing = request.starts_with(b"POST /api/v1/cfssl/authsign");
                let mut server = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                server.write_all(&request).unwrap();
                let Some(answer) = read_http_message(&mut server) else {
                    return;
                };
                if signing {
                    std::thread::sleep(delay);
                }
                let _ = client.write_all(&answer);
            });
        }
    });
    url
}

/// One HTTP/1.1 message (head and Content-Length body) read from `stream`.
fn read_http_message(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut message = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(end) = message.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&message[..end]).to_lowercase();
            let length: usize = head
                .split("content-length:")
                .nth(1)
                .and_then(|rest| rest.split("\r\n").next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            if message.len() >= end + 4 + length {
                return Some(message);
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(n) => message.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The upstream issues the certificate, but only after payra's deadline: the phone is told
/// to retry and nothing is stored, and the late certificate is revoked upstream rather than
/// left valid with no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_after_the_deadline_is_revoked_upstream() {
    let cfssl = Cfssl::start(DEVICE_USAGES);
    let proxy = delaying_proxy(cfssl.port, std::time::Duration::from_millis(1_500));
    let server = TestServer::start_with(|config| {
        cfssl.payra_config(config);
        config.ca.upstream.url = Some(proxy.clone());
        config.ca.upstream.timeout_ms = 300;
    })
    .await;
    let token = server.token("acme").await;
    enrollment_refused(
        &server,
        &token,
        tonic::Code::Unavailable,
        "did not answer in time",
    )
    .await;

    // The late answer comes, is recorded as an orphan and revoked: wait for that state, a
    // bounded number of passes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let pending = pending_after_retry(&server).await;
        let row = sqlite(
            &cfssl.path("certdb.db"),
            "SELECT status, reason FROM certificates",
        );
        if pending.is_empty() && row.trim() == "revoked|5" {
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {row:?}, pending {pending:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status.trim(), "revoked|5", "cessationOfOperation");
    let listed = server
        .operator()
        .await
        .list_certificates(proto::ListCertificatesRequest::default())
        .await
        .unwrap();
    assert!(listed.certificates.is_empty(), "nothing stored");
}

/// The CLI acts as a phone in RA mode: it enrolls, pays, and renews by proof by itself (the
/// upstream's certificate carries no payra role, so it is not presented over TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_enrolls_pays_and_renews_through_the_upstream() {
    let cfssl = Cfssl::start(DEVICE_USAGES);
    let server = TestServer::start_with(|config| cfssl.payra_config(config)).await;
    let dir = server.dir.path().join("cli-upstream");
    let token = server.token("acme").await;
    let (ok, stdout, stderr) = run_payra_at(
        &server,
        &[
            "device",
            "enroll",
            "--token",
            &token,
            "--device",
            "phone-1",
            "--out",
            path_str(&dir),
        ],
    );
    assert!(ok, "{stderr}");
    let serial = stdout.trim().to_string();
    assert_eq!(cfssl.db_status(&serial), Some(("good".into(), 0)));
    assert_eq!(cli_pay(&server, &dir, "o-1")["verdict"], "VERIFIED");

    let (ok, stdout, stderr) = run_payra_at(
        &server,
        &["device", "renew", "--device-dir", path_str(&dir)],
    );
    assert!(ok, "{stderr}");
    let renewed = stdout.trim().to_string();
    assert_ne!(renewed, serial);
    assert_eq!(cfssl.db_status(&renewed), Some(("good".into(), 0)));
    assert_eq!(cli_pay(&server, &dir, "o-2")["verdict"], "VERIFIED");
    let (ok, stdout, _) = run_payra_at(&server, &["certs", "show", &renewed]);
    assert!(
        ok && stdout.contains("the upstream CA (RA mode)"),
        "{stdout}"
    );
}
