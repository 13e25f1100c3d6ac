//! The issuing key in a real SoftHSM2 token (Debian's `softhsm2`): enroll, renew, revoke, CRL
//! and OCSP checked by OpenSSL as with the key file; a key that does not match `issuing.pem`
//! and a wrong PIN refused at start; a token removed while serving answered `UNAVAILABLE`.
//!
//! SoftHSM2 reads its configuration and finds its tokens when the module is first
//! initialised in a process, so this binary makes every token it needs once, before any test
//! loads the module. Without SoftHSM2 the tests return early and say so.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use common::*;
use payra::ca::pkcs11::KeyLocation;
use payra::ca::Pkcs11Signer;
use payra::client::DeviceKey;
use payra::config::Pkcs11Config;
use payra::wire::proto;
use proto::RevocationReason as Reason;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "4321-payra";
/// The tokens the tests use: one shared, and one each for a test that deletes its token, one
/// that tries a wrong PIN (a token another session is logged in to accepts any PIN: the
/// login is the application's) and one that logs its application out.
const TOKENS: [&str; 4] = ["payra-main", "payra-doomed", "payra-pin", "payra-relogin"];

/// The SoftHSM2 fixture: its directory, and each token's directory by label.
struct SoftHsm {
    dir: PathBuf,
    token_dirs: Vec<(String, PathBuf)>,
}

static SOFTHSM: OnceLock<Option<SoftHsm>> = OnceLock::new();

fn softhsm2_util(args: &[&str]) -> std::process::Output {
    std::process::Command::new("softhsm2-util")
        .args(args)
        .output()
        .expect("run softhsm2-util")
}

/// The fixture, or `None` after saying (past the output capture) that `test` is skipped.
fn softhsm(test: &str) -> Option<&'static SoftHsm> {
    let fixture = SOFTHSM.get_or_init(|| {
        let present = Path::new(MODULE).exists()
            && std::process::Command::new("softhsm2-util")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
        if !present {
            let _ = writeln!(
                std::io::stderr(),
                "\nSKIPPED: the PKCS#11 tests: SoftHSM2 is not installed ({MODULE}); \
                 apt-get install softhsm2 (the CI does) to run them."
            );
            return None;
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("softhsm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        // Before the module is first loaded in this process (it reads this then).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let mut token_dirs = Vec::new();
        for label in TOKENS {
            let before: Vec<_> = token_subdirs(&dir);
            let output = softhsm2_util(&[
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                "so-pin-5678",
            ]);
            assert!(output.status.success(), "{output:?}");
            let made = token_subdirs(&dir)
                .into_iter()
                .find(|d| !before.contains(d))
                .expect("the new token's directory");
            token_dirs.push((label.to_string(), made));
        }
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Some(SoftHsm { dir, token_dirs })
    });
    if fixture.is_none() {
        let _ = writeln!(std::io::stderr(), "skipped (no SoftHSM2): {test}");
    }
    fixture.as_ref()
}

fn token_subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("tokens"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect()
}

impl SoftHsm {
    /// `[pkcs11]` naming key `label` in `token`, by URI (the PIN file in it).
    fn config(&self, token: &str, label: &str) -> Pkcs11Config {
        Pkcs11Config {
            uri: Some(format!(
                "pkcs11:token={token};object={label};type=private\
                 ?module-path={MODULE}&pin-source=file:{}",
                self.dir.join("pin").display()
            )),
            sessions: 2,
            ..Pkcs11Config::default()
        }
    }

    /// A PKI in a new directory whose issuing key is generated in `token` as `label`.
    fn pki(&self, token: &str, label: &str) -> (tempfile::TempDir, Pkcs11Config) {
        let config = self.config(token, label);
        let location = KeyLocation::from_config(&config).unwrap();
        let signer = Pkcs11Signer::generate(&location).expect("generate in the token");
        let dir = tempfile::tempdir().unwrap();
        payra::ca::pki::init_pki_with_issuing_signer(
            &dir.path().join("certs"),
            false,
            Arc::new(signer),
        )
        .expect("init with the token's key");
        (dir, config)
    }

    fn token_dir(&self, label: &str) -> &Path {
        &self
            .token_dirs
            .iter()
            .find(|(l, _)| l == label)
            .expect("a fixture token")
            .1
    }
}

async fn serve(pki: &Path, pkcs11: Pkcs11Config) -> TestServer {
    let certs = pki.join("certs");
    TestServer::start_with(move |config| {
        config.certs_dir = certs;
        config.pkcs11 = pkcs11;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_enroll_renew_revoke_crl_and_ocsp_with_the_issuing_key_in_softhsm2() {
    let Some(hsm) = softhsm("hsm::ok_enroll_renew_revoke_crl_and_ocsp") else {
        return;
    };
    let (pki, config) = hsm.pki("payra-main", "issuing-ok");
    assert!(
        !pki.path().join("certs/issuing.key").exists(),
        "the issuing key stays in the token"
    );
    // Nor does init put an SM2 issuing key on disk beside it.
    for file in ["sm2-issuing.key", "sm2-root.key", "sm2-issuing.pem"] {
        assert!(!pki.path().join("certs").join(file).exists(), "{file}");
    }
    let server = serve(pki.path(), config).await;

    let good = enrolled(&server, "hana", "h-1").await;
    let (ok, text) = openssl_verify_with_crl(&server, &good.dir.join("leaf.pem")).await;
    assert!(
        ok,
        "OpenSSL verifies a certificate the token signed: {text}"
    );

    let new_key = DeviceKey::generate();
    let renewed = renew_as(&server, &good.dir, &new_key, "h-1")
        .await
        .expect("renew");
    assert_ne!(renewed.serial, good.issued.serial);
    let renewed_dir =
        write_device_dir(&server.dir.path().join(&renewed.serial), &new_key, &renewed);
    let (ok, text) = openssl_verify_with_crl(&server, &renewed_dir.join("leaf.pem")).await;
    assert!(ok, "{text}");

    let bad = enrolled(&server, "hana", "h-2").await;
    server
        .revoke(&bad.issued.serial, Reason::KeyCompromise)
        .await;
    let (ok, text) = openssl_verify_with_crl(&server, &bad.dir.join("leaf.pem")).await;
    assert!(!ok, "the CRL the token signed lists it: {text}");
    assert!(text.contains("certificate revoked"), "{text}");
    let (ok, text) = openssl_ocsp(&server, &bad.dir.join("leaf.pem"));
    assert!(ok, "{text}");
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(text.contains(": revoked"), "{text}");
    let (ok, text) = openssl_ocsp(&server, &renewed_dir.join("leaf.pem"));
    assert!(ok && text.contains(": good"), "{text}");
}

#[tokio::test]
async fn fail_a_token_key_that_is_not_the_issuing_certificates_or_a_wrong_pin_is_refused() {
    let Some(hsm) = softhsm("hsm::fail_a_token_key_that_is_not_the_issuing") else {
        return;
    };
    let (pki, _) = hsm.pki("payra-main", "issuing-mine");
    let other = hsm.config("payra-main", "issuing-other");
    Pkcs11Signer::generate(&KeyLocation::from_config(&other).unwrap()).unwrap();
    let mut config = payra::config::Config {
        certs_dir: pki.path().join("certs"),
        pkcs11: other,
        ..payra::config::Config::default()
    };
    let refused = payra::server::load_ca(&config)
        .err()
        .expect("another key is refused")
        .to_string();
    assert!(
        refused.contains("does not match the public key of") && refused.contains("issuing.pem"),
        "{refused}"
    );

    let wrong_pin = hsm.dir.join("wrong-pin");
    std::fs::write(&wrong_pin, "0000-wrong").unwrap();
    std::fs::set_permissions(
        &wrong_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    config.pkcs11 = hsm.config("payra-pin", "any-key");
    config.pkcs11.uri = config.pkcs11.uri.map(|uri| {
        uri.replace(
            &hsm.dir.join("pin").display().to_string(),
            &wrong_pin.display().to_string(),
        )
    });
    let refused = payra::server::load_ca(&config)
        .err()
        .expect("a wrong PIN is refused")
        .to_string();
    assert!(refused.contains("refused the PIN"), "{refused}");

    config.pkcs11 = hsm.config("payra-main", "no-such-key");
    let refused = payra::server::load_ca(&config)
        .err()
        .expect("a missing key is refused")
        .to_string();
    assert!(
        refused.contains("no private key \"no-such-key\""),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_token_removed_while_serving_gives_unavailable_and_readyz_says_why() {
    let Some(hsm) = softhsm("hsm::fail_a_token_removed_while_serving") else {
        return;
    };
    let (pki, config) = hsm.pki("payra-doomed", "issuing-doomed");
    let server = serve(pki.path(), config).await;
    let (code, _, _) = http_get(&server.http_url("/readyz")).await;
    assert_eq!(code, 200);
    let first = enrolled(&server, "ida", "i-1").await;

    std::fs::remove_dir_all(hsm.token_dir("payra-doomed")).unwrap();

    let token = server.token("ida").await;
    let key = DeviceKey::generate();
    let refused = server
        .anonymous()
        .await
        .enroll(&token, key.csr_der("i-2").unwrap(), "i-2", device_info())
        .await
        .expect_err("no certificate without the issuing key");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("PKCS#11"), "{refused:?}");
    let (code, _, body) = http_get(&server.http_url("/readyz")).await;
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("PKCS#11"), "{body}");

    // A revocation needs no signature and is taken; the CRL and OCSP answers that would
    // show it need one: "retry shortly", not an internal error.
    server
        .revoke(&first.issued.serial, Reason::KeyCompromise)
        .await;
    let (code, headers, _) = http_get(&server.http_url("/crl")).await;
    assert_eq!(code, 503, "{headers}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after"),
        "{headers}"
    );
    let (_, text) = openssl_ocsp(&server, &first.dir.join("leaf.pem"));
    assert!(text.to_ascii_lowercase().contains("trylater"), "{text}");
}

#[tokio::test]
async fn ok_a_lost_login_is_recovered_by_the_next_signature_on_a_new_session() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use p256::ecdsa::signature::Verifier;
    use payra::ca::CaSigner;
    let Some(hsm) = softhsm("hsm::ok_a_lost_login_is_recovered") else {
        return;
    };
    let config = hsm.config("payra-relogin", "issuing-relogin");
    let location = KeyLocation::from_config(&config).unwrap();
    let signer = Pkcs11Signer::generate(&location).unwrap();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(signer.public_key_sec1()).unwrap();
    let check = |message: &[u8]| {
        let der = signer.sign(message).expect("signs");
        let signature = p256::ecdsa::Signature::from_der(&der).expect("DER");
        key.verify(message, &signature).expect("verifies");
    };
    check(b"before");
    assert_eq!(signer.lost_sessions(), 0);

    // Another session of this process logs out: the login is the application's, so every
    // session of the signer loses it, and its key handle goes stale.
    let p11 = Pkcs11::new(MODULE).unwrap();
    let _ = p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = p11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| p11.get_token_info(*slot).unwrap().label() == "payra-relogin")
        .unwrap();
    let session = p11.open_ro_session(slot).unwrap();
    session.logout().unwrap();

    check(b"after the logout");
    assert_eq!(
        signer.lost_sessions(),
        1,
        "the stale session was found out and replaced"
    );
}
