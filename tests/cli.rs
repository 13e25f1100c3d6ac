//! End to end through the `payra` binary, as an operator or developer would type it.

mod common;

use common::*;

use common::run_payra as payra;

/// A device directory as `payra device enroll`/`renew` leave it: `device.key` for the owner
/// only, and `device.pem` (leaf and issuing CA) verifying to the root with OpenSSL.
fn assert_device_dir(out: &std::path::Path, certs: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "device.key is private");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        &format!("{certs}/root.pem"),
        "-untrusted",
        path_str(&out.join("device.pem")),
        path_str(&out.join("device.pem")),
    ]);
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_token_create_then_device_enroll_then_certs_show() {
    let server = TestServer::start().await;
    let url = server.url();
    let certs = server.certs();
    let certs = path_str(&certs);

    let (ok, stdout, stderr) = payra(&[
        "token",
        "create",
        "--customer",
        "alice",
        "--server",
        &url,
        "--certs",
        certs,
    ]);
    assert!(ok, "{stderr}");
    let token = stdout.trim().to_string();
    assert!(token.starts_with("payra_et_"), "{stdout}");

    let out = server.dir.path().join("phone-1");
    let (ok, stdout, stderr) = payra(&[
        "device",
        "enroll",
        "--token",
        &token,
        "--device",
        "phone-1",
        "--out",
        path_str(&out),
        "--server",
        &url,
        "--certs",
        certs,
    ]);
    assert!(ok, "{stderr}");
    let serial = stdout.trim().to_string();
    assert_device_dir(&out, certs);

    let (ok, stdout, stderr) = payra(&[
        "certs", "show", &serial, "--json", "--server", &url, "--certs", certs,
    ]);
    assert!(ok, "{stderr}");
    let record: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(record["serial"], serial.as_str());
    assert_eq!(record["customer_id"], "alice");
    assert_eq!(record["status"], "valid");

    // Human output: RFC 3339 times with a hint, not bare Unix seconds.
    let (ok, stdout, stderr) =
        payra(&["certs", "show", &serial, "--server", &url, "--certs", certs]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("not after    20"), "{stdout}");
    assert!(stdout.contains("Z (in "), "{stdout}");

    // The phone renews from its directory; the directory then holds the new key and
    // certificate, and the old certificate is superseded.
    let (ok, stdout, stderr) = payra(&[
        "device",
        "renew",
        "--device-dir",
        path_str(&out),
        "--server",
        &url,
        "--certs",
        certs,
    ]);
    assert!(ok, "{stderr}");
    let renewed = stdout.trim().to_string();
    assert_ne!(renewed, serial);
    assert!(stderr.contains("superseded"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("serial")).unwrap().trim(),
        renewed
    );
    let (ok, stdout, stderr) = payra(&[
        "certs", "show", &serial, "--json", "--server", &url, "--certs", certs,
    ]);
    assert!(ok, "{stderr}");
    let old: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(old["status"], "superseded");
    assert_device_dir(&out, certs);

    // Reusing the token fails with a non-zero exit and the server's message.
    let (ok, _, stderr) = payra(&[
        "device",
        "enroll",
        "--token",
        &token,
        "--device",
        "phone-2",
        "--out",
        path_str(&server.dir.path().join("phone-2")),
        "--server",
        &url,
        "--certs",
        certs,
    ]);
    assert!(!ok);
    assert!(stderr.contains("already been used"), "{stderr}");
}

#[test]
fn fail_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, _, stderr) = payra(&["init", "--dir", path_str(&certs)]);
    assert!(ok, "{stderr}");
    for name in [
        "root.pem",
        "root.key",
        "issuing.pem",
        "issuing.key",
        "server.pem",
        "server.key",
        "operator.pem",
        "operator.key",
        "service.pem",
        "service.key",
    ] {
        assert!(certs.join(name).exists(), "{name}");
    }
    let (ok, _, stderr) = payra(&["init", "--dir", path_str(&certs)]);
    assert!(!ok);
    assert!(stderr.contains("--force"), "{stderr}");
    let (ok, _, stderr) = payra(&["init", "--dir", path_str(&certs), "--force"]);
    assert!(ok, "{stderr}");
    // The development PKI chains: issuing under root, pathlen 0.
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&certs.join("root.pem")),
        path_str(&certs.join("issuing.pem")),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&[
        "x509",
        "-in",
        path_str(&certs.join("issuing.pem")),
        "-noout",
        "-text",
    ]);
    assert!(ok);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    let (_, text) = openssl(&[
        "x509",
        "-in",
        path_str(&certs.join("operator.pem")),
        "-noout",
        "-text",
    ]);
    assert!(text.contains("URI:urn:payra:role:operator"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_revoke_unhold_and_list_from_the_cli() {
    let server = TestServer::start().await;
    let url = server.url();
    let certs = server.certs();
    let certs = path_str(&certs);
    let (_, a) = server.enroll("kate", "kate-phone").await;
    let (_, b) = server.enroll("kate", "kate-tablet").await;
    let conn = ["--server", url.as_str(), "--certs", certs];

    let mut args = vec!["revoke", "--customer", "kate", "--dry-run", "--json"];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    let dry: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["revoked_serials"].as_array().unwrap().len(), 2);

    let mut args = vec!["revoke", a.serial.as_str(), "--reason", "certificate-hold"];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("revoked {}", a.serial)),
        "{stdout}"
    );

    let mut args = vec![
        "certs",
        "list",
        "--customer",
        "kate",
        "--status",
        "on-hold",
        "--json",
    ];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let items = listed["certificates"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["serial"], a.serial.as_str());
    assert_eq!(items[0]["revocation_reason"], "certificate-hold");

    let mut args = vec!["unhold", a.serial.as_str()];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");

    let mut args = vec![
        "revoke",
        "--device",
        "kate-tablet",
        "--reason",
        "key-compromise",
    ];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&b.serial), "{stdout}");

    // A second revocation fails with a non-zero exit and the server's message.
    let mut args = vec!["revoke", b.serial.as_str(), "--reason", "key-compromise"];
    args.extend(conn);
    let (ok, _, stderr) = payra(&args);
    assert!(!ok);
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("already revoked"),
        "{stderr}"
    );

    let mut args = vec!["certs", "list", "--customer", "kate"];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("SERIAL"), "{stdout}");
    assert!(
        stdout.contains("revoked") && stdout.contains("valid"),
        "{stdout}"
    );
    let mut args = vec!["certs", "list", "--customer", "kate", "--output", "csv"];
    args.extend(conn);
    let (ok, stdout, stderr) = payra(&args);
    assert!(ok, "{stderr}");
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("serial,customer_id,device_id,status,not_before_unix_s,not_after_unix_s,revoked_at_unix_s,revocation_reason,attestation")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(
        rows.iter()
            .all(|r| r.len() == 9 && r[1] == "kate" && r[8] == "none"),
        "{stdout}"
    );
    assert!(
        rows.iter()
            .any(|r| r[3] == "revoked" && r[7] == "key-compromise"),
        "{stdout}"
    );

    // The service credential cannot revoke: the CLI uses operator.pem, so swap it in.
    let swapped = server.dir.path().join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    std::fs::copy(server.certs().join("root.pem"), swapped.join("root.pem")).unwrap();
    std::fs::copy(
        server.certs().join("service.pem"),
        swapped.join("operator.pem"),
    )
    .unwrap();
    std::fs::copy(
        server.certs().join("service.key"),
        swapped.join("operator.key"),
    )
    .unwrap();
    let (ok, _, stderr) = payra(&[
        "revoke",
        a.serial.as_str(),
        "--server",
        url.as_str(),
        "--certs",
        path_str(&swapped),
    ]);
    assert!(!ok);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_issue_client_writes_a_working_credential() {
    let server = TestServer::start().await;
    let url = server.url();
    let certs = server.certs();
    let out = server.dir.path().join("creds");
    let (ok, stdout, stderr) = payra(&[
        "issue-client",
        "--role",
        "service",
        "--name",
        "billing",
        "--out",
        path_str(&out),
        "--server",
        &url,
        "--certs",
        path_str(&certs),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim().len(), 32, "prints the serial: {stdout}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("billing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (_, text) = openssl(&[
        "x509",
        "-in",
        path_str(&out.join("billing.pem")),
        "-noout",
        "-text",
    ]);
    assert!(text.contains("URI:urn:payra:role:service"), "{text}");
    let client = server
        .client(payra::client::Credential::Files {
            certificate: out.join("billing.pem"),
            key: out.join("billing.key"),
        })
        .await;
    client
        .create_enrollment_token("c", 0)
        .await
        .expect("the new credential works");
    let (ok, _, stderr) = payra(&[
        "issue-client",
        "--role",
        "device",
        "--name",
        "x",
        "--server",
        &url,
        "--certs",
        path_str(&certs),
    ]);
    assert!(!ok, "only service and operator roles: {stderr}");
}

/// Every file below `dir` with its length, modification time and contents.
fn snapshot(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (u64, std::time::SystemTime, Vec<u8>)> {
    let mut files = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                files.insert(
                    entry.path().display().to_string(),
                    (
                        meta.len(),
                        meta.modified().unwrap(),
                        std::fs::read(entry.path()).unwrap(),
                    ),
                );
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_audit_verify_writes_nothing_to_the_data_it_checks() {
    let mut server = TestServer::start().await;
    server.enroll("wanda", "w-1").await;
    server.stop().await;
    let data = server.config.data_dir.clone();
    let before = snapshot(&data);
    let certs = server.certs();
    let (ok, stdout, stderr) = payra(&[
        "audit",
        "verify",
        "--data",
        path_str(&data),
        "--certs",
        path_str(&certs),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("audit log intact"), "{stdout}");
    let after = snapshot(&data);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "no file added or removed"
    );
    for (path, (len, modified, bytes)) in &before {
        let (len_after, modified_after, bytes_after) = &after[path];
        assert!(
            len == len_after && modified == modified_after && bytes == bytes_after,
            "{path} changed"
        );
    }
}

/// Rewrites every frame of a decision-log segment with `edit` applied to record `target`'s
/// JSON, recomputing each frame's CRC and the hash chain from there on, as someone with write
/// access to the data directory could.
fn rewrite_decision_log(path: &std::path::Path, target: u64, edit: impl Fn(&str) -> String) {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut prev = [0u8; 32];
    let mut offset = 0;
    while offset + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        let body = &bytes[offset + 8..offset + 8 + len];
        let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
        let mut json = String::from_utf8(body[40..].to_vec()).unwrap();
        if seq == target {
            json = edit(&json);
        }
        let mut hasher = Sha256::new();
        hasher.update(prev);
        hasher.update(seq.to_le_bytes());
        hasher.update(json.as_bytes());
        let hash: [u8; 32] = hasher.finalize().into();
        let mut frame = Vec::new();
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&hash);
        frame.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&frame).to_le_bytes());
        out.extend_from_slice(&frame);
        prev = hash;
        offset += 8 + len;
    }
    std::fs::write(path, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_tampering_with_the_audit_chains_is_caught_by_the_signed_heads() {
    use payra::wire::proto;
    let mut server = TestServer::start().await;
    server.enroll("xena", "x-1").await;
    let service = server.service().await;
    for n in 0..3 {
        service
            .verification()
            .qualify_transaction(proto::QualifyTransactionRequest {
                customer_id: "xena".into(),
                transaction: Some(proto::Transaction {
                    merchant_id: "m".into(),
                    order_id: format!("o-{n}"),
                    amount_fen: 10_000,
                    currency: "CNY".into(),
                }),
                factors: vec![],
                scene: proto::Scene::InApp as i32,
                reserve: true,
            })
            .await
            .unwrap();
    }
    // Shutdown signs the heads of both chains.
    server.stop().await;
    let data = server.config.data_dir.clone();
    let certs = server.certs();
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            "--data",
            path_str(&data),
            "--certs",
            path_str(&certs),
        ];
        args.extend_from_slice(extra);
        payra(&args)
    };
    let (ok, stdout, stderr) = verify(&[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("signed heads hold"), "{stdout}");
    assert!(stdout.contains("decision record 3"), "{stdout}");

    // The latest head, kept outside the machine.
    let (ok, head, stderr) = payra(&["audit", "head", "--data", path_str(&data)]);
    assert!(ok, "{stderr}");
    let anchor = server.dir.path().join("anchor.json");
    std::fs::write(&anchor, &head).unwrap();
    let (ok, stdout, stderr) = verify(&["--anchor", path_str(&anchor)]);
    assert!(ok && stdout.contains("the anchor"), "{stdout}{stderr}");

    // A reservation edited down and every hash after it recomputed: the chain is intact, the
    // signed head is not.
    let segment = data.join("decisions").join("00000000000000000001.log");
    let original = std::fs::read(&segment).unwrap();
    rewrite_decision_log(&segment, 2, |json| {
        json.replace("\"reserved_fen\":10000", "\"reserved_fen\":1")
    });
    assert_ne!(std::fs::read(&segment).unwrap(), original, "the edit took");
    let (ok, _, stderr) = verify(&[]);
    assert!(!ok, "an edited, re-hashed record passed");
    assert!(
        stderr.contains("signed head") && stderr.contains("altered"),
        "{stderr}"
    );

    // The newest record dropped, and the signed heads with it: the ledger checkpoint still
    // covers it.
    std::fs::write(&segment, &original).unwrap();
    rewrite_decision_log(&segment, 0, |json| json.to_string());
    let frames = std::fs::read(&segment).unwrap();
    let last_len = {
        // Walk to the last frame's start.
        let mut offset = 0;
        let mut last = 0;
        while offset < frames.len() {
            last = offset;
            offset +=
                8 + u32::from_le_bytes(frames[offset..offset + 4].try_into().unwrap()) as usize;
        }
        last
    };
    let heads = std::fs::read(data.join("audit-heads.log")).unwrap();
    std::fs::remove_file(data.join("audit-heads.log")).unwrap();
    // With the heads gone, intact chains are not enough.
    let (ok, _, stderr) = verify(&[]);
    assert!(!ok && stderr.contains("no signed head"), "{stderr}");
    let (ok, stdout, stderr) = verify(&["--allow-unsigned"]);
    assert!(ok, "{stdout}{stderr}");
    std::fs::write(&segment, &frames[..last_len]).unwrap();
    let (ok, _, stderr) = verify(&["--allow-unsigned"]);
    assert!(!ok, "a dropped tail passed");
    assert!(stderr.contains("ledger checkpoint"), "{stderr}");
    // And with the anchor kept outside.
    let (ok, _, stderr) = verify(&["--anchor", path_str(&anchor)]);
    assert!(!ok, "{stderr}");
    std::fs::write(data.join("audit-heads.log"), heads).unwrap();
}

#[test]
fn ok_completions_and_man_pages_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (ok, stdout, stderr) = payra(&["completions", shell]);
        assert!(ok, "{shell}: {stderr}");
        assert!(
            stdout.contains("limits") && stdout.contains("renew"),
            "{shell}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = payra(&["man", "--out", path_str(dir.path())]);
    assert!(ok, "{stderr}");
    let page = std::fs::read_to_string(dir.path().join("payra-limits-show.1")).unwrap();
    assert!(page.contains(".TH payra-limits-show"), "{page}");
    assert!(dir.path().join("payra.1").exists());
    assert!(dir.path().join("payra-device-renew.1").exists());
}

#[test]
fn fail_connection_errors_name_the_cause_and_the_next_step() {
    // No PKI where --certs points.
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = payra(&[
        "certs",
        "list",
        "--certs",
        path_str(&dir.path().join("nowhere")),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("root.pem not found") && stderr.contains("payra init"),
        "{stderr}"
    );
    // A PKI, but nothing listening.
    let certs = dir.path().join("certs");
    payra::ca::init_dev_pki(&certs, false).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, _, stderr) = payra(&[
        "certs",
        "list",
        "--certs",
        path_str(&certs),
        "--server",
        &format!("https://localhost:{port}"),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("Is payra running") && stderr.contains("--server"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_wrong_role_or_a_revoked_credential_says_what_to_do() {
    let server = TestServer::start().await;
    let url = server.url();
    let certs = server.certs();
    // The service's credential where the operator's is expected: the role is refused.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("certs");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(certs.join("root.pem"), wrong.join("root.pem")).unwrap();
    std::fs::copy(certs.join("service.pem"), wrong.join("operator.pem")).unwrap();
    std::fs::copy(certs.join("service.key"), wrong.join("operator.key")).unwrap();
    let (ok, _, stderr) = payra(&[
        "certs",
        "list",
        "--certs",
        path_str(&wrong),
        "--server",
        &url,
    ]);
    assert!(!ok);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(
        stderr.contains("needs another role") && stderr.contains("payra issue-client"),
        "{stderr}"
    );

    // The service's credential revoked: it is not accepted any more.
    let pem = std::fs::read_to_string(certs.join("service.pem")).unwrap();
    let der = ::pem::parse(pem).unwrap().into_contents();
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let serial = hex::encode(parsed.raw_serial());
    let (ok, _, stderr) = payra(&[
        "revoke",
        &serial,
        "--reason",
        "key-compromise",
        "--certs",
        path_str(&certs),
        "--server",
        &url,
    ]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = payra(&[
        "token",
        "create",
        "--customer",
        "c-cli",
        "--certs",
        path_str(&certs),
        "--server",
        &url,
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("revoked"),
        "{stderr}"
    );
    assert!(stderr.contains("issue a new one"), "{stderr}");
}

#[test]
fn fail_an_expired_client_certificate_is_named_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    payra::ca::init_dev_pki(&certs, false).unwrap();
    let expired = dir.path().join("expired");
    std::fs::create_dir_all(&expired).unwrap();
    std::fs::copy(certs.join("root.pem"), expired.join("root.pem")).unwrap();
    let key = expired.join("service.key");
    let csr = dir.path().join("service.csr");
    let ext = dir.path().join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=URI:urn:payra:role:service\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            path_str(&key),
        ],
        vec![
            "req",
            "-new",
            "-key",
            path_str(&key),
            "-subj",
            "/CN=old",
            "-out",
            path_str(&csr),
        ],
    ] {
        let (ok, text) = openssl(&args);
        assert!(ok, "{text}");
    }
    // Valid until yesterday.
    let (ok, text) = openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr),
        "-CA",
        path_str(&certs.join("issuing.pem")),
        "-CAkey",
        path_str(&certs.join("issuing.key")),
        "-CAcreateserial",
        "-days",
        "-1",
        "-extfile",
        path_str(&ext),
        "-out",
        path_str(&expired.join("service.pem")),
    ]);
    assert!(ok, "{text}");
    let (ok, _, stderr) = payra(&[
        "token",
        "create",
        "--customer",
        "c",
        "--certs",
        path_str(&expired),
        "--server",
        "https://localhost:1",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("service.pem expired at") && stderr.contains("payra issue-client"),
        "{stderr}"
    );
}
