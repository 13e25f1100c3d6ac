//! The issuing key in a file beside the same key in a SoftHSM2 token (PKCS#11), in one run:
//! a bare signature, a device certificate issued, an uncached OCSP answer (a request with a
//! nonce, signed for it) and a CRL of 1,000 entries. Needs Debian's `softhsm2`; without it
//! only the file signer is measured. Run: `cargo bench --bench signers`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use payra::ca::pkcs11::KeyLocation;
use payra::ca::{
    build_crl, init_dev_pki, issue_device_certificate, CaMaterial, CrlEntry, DeviceProfile,
    OcspResponder, OcspStatus, Pkcs11Signer,
};
use payra::client::DeviceKey;
use payra::config::Pkcs11Config;
use payra::model::{RevocationReason, Serial};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token with a fresh issuing key and a PKI around it, in `dir`; `None` without
/// SoftHSM2.
fn token_pki(dir: &Path) -> Option<CaMaterial> {
    if !Path::new(MODULE).exists() {
        eprintln!("SoftHSM2 is not installed ({MODULE}): measuring the file signer only");
        return None;
    }
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
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let made = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234").unwrap();
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let location = KeyLocation::from_config(&Pkcs11Config {
        uri: Some(format!(
            "pkcs11:token=bench;object=issuing?module-path={MODULE}&pin-source=file:{}",
            pin.display()
        )),
        ..Pkcs11Config::default()
    })
    .unwrap();
    let signer: Arc<dyn payra::ca::CaSigner> = Arc::new(Pkcs11Signer::generate(&location).unwrap());
    payra::ca::pki::init_pki_with_issuing_signer(&dir.join("certs"), false, signer.clone())
        .unwrap();
    Some(CaMaterial::load_with_signer(&dir.join("certs"), signer, "the token's key").unwrap())
}

/// An OCSP request with a nonce for `certs/server.pem`, made by OpenSSL.
fn ocsp_request(certs: &Path) -> Vec<u8> {
    let out = certs.join("request.der");
    let made = std::process::Command::new("openssl")
        .args(["ocsp", "-issuer"])
        .arg(certs.join("issuing.pem"))
        .arg("-cert")
        .arg(certs.join("server.pem"))
        .arg("-reqout")
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    std::fs::read(out).unwrap()
}

fn signers(c: &mut Criterion) {
    let file_dir = tempfile::tempdir().unwrap();
    init_dev_pki(&file_dir.path().join("certs"), false).unwrap();
    let file = CaMaterial::load(&file_dir.path().join("certs"), None).unwrap();
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_pki(token_dir.path());
    let mut setups = vec![("file", &file, file_dir.path())];
    if let Some(token) = &token {
        setups.push(("pkcs11", token, token_dir.path()));
    }

    let csr = DeviceKey::generate().csr_der("d").unwrap();
    let key = payra::ca::parse_device_csr(&csr).unwrap();
    let subscriber = payra::ca::SubscriberRef::random();
    let entries: Vec<CrlEntry> = (0..1_000)
        .map(|_| CrlEntry {
            serial: Serial::random(),
            revoked_at_s: 1_800_000_000,
            reason: RevocationReason::KeyCompromise,
        })
        .collect();
    for (name, ca, dir) in setups {
        let mut group = c.benchmark_group(format!("signer {name}"));
        group.bench_function("sign 100 bytes", |b| {
            b.iter(|| ca.signer.sign(black_box(&[7u8; 100])).unwrap())
        });
        let profile = DeviceProfile {
            validity_s: 365 * 86_400,
            backdate_s: 300,
            crl_url: "http://127.0.0.1:8080/crl".into(),
            ocsp_url: "http://127.0.0.1:8080/ocsp".into(),
            issuer_not_after_s: ca.issuing_not_after_s,
        };
        group.bench_function("issue device certificate", |b| {
            b.iter(|| {
                issue_device_certificate(
                    &ca.issuer,
                    &profile,
                    &key,
                    &Serial::random(),
                    &subscriber,
                    1_800_000_000,
                )
                .unwrap()
            })
        });
        let responder = OcspResponder::new(&ca.issuing_der, ca.signer.clone()).unwrap();
        let request = responder
            .parse_request(&ocsp_request(&dir.join("certs")))
            .expect("a request for the issuer's certificate");
        assert!(request.nonce.is_some(), "OpenSSL adds a nonce");
        group.bench_function("OCSP answer with a nonce (uncached)", |b| {
            b.iter(|| {
                responder
                    .respond(&request, &[OcspStatus::Good], 1_800_000_000, 3_600)
                    .unwrap()
            })
        });
        group.sample_size(20);
        group.bench_function("CRL with 1,000 entries", |b| {
            b.iter(|| {
                build_crl(
                    &ca.issuer,
                    &ca.issuing_key_id,
                    1,
                    1_800_000_000,
                    1_800_086_400,
                    black_box(&entries),
                )
                .unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, signers);
criterion_main!(benches);
