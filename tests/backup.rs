//! End to end: online backup through the CLI, restore, the un-revocation guard and a
//! corrupted file.

mod common;

use common::*;
use payra::wire::proto;
use tonic::Code;

use common::run_payra as payra;

async fn exists(server: &TestServer, serial: &str) -> Option<proto::CertificateRecord> {
    match server.operator().await.certificate(serial).await {
        Ok(record) => Some(record),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => panic!("{status:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_round_trip_and_guard() {
    let mut server = TestServer::start().await;
    let (_, before) = server.enroll("bk", "bk-1").await;
    let file = server.dir.path().join("payra.backup");
    let (ok, stdout, stderr) = payra(&[
        "backup",
        "--out",
        path_str(&file),
        "--server",
        &server.url(),
        "--certs",
        path_str(&server.certs()),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("sha256"), "{stdout}");

    // Changes after the snapshot: a new certificate, and a revocation of the old one.
    let (_, after) = server.enroll("bk", "bk-2").await;
    server
        .revoke(&before.serial, proto::RevocationReason::KeyCompromise)
        .await;
    server.stop().await;
    let data = server.config.data_dir.clone();

    // A corrupted file is refused and changes nothing.
    let corrupted = server.dir.path().join("corrupted.backup");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&corrupted, bytes).unwrap();
    let fresh = server.dir.path().join("fresh");
    let (ok, _, stderr) = payra(&["restore", path_str(&corrupted), "--data", path_str(&fresh)]);
    assert!(!ok);
    assert!(stderr.contains("corrupted"), "{stderr}");
    assert!(
        !fresh.join("db").exists(),
        "nothing written for a corrupted file"
    );

    // Restoring over the current data would un-revoke: refused, naming the serial.
    let (ok, _, stderr) = payra(&["restore", path_str(&file), "--data", path_str(&data)]);
    assert!(!ok);
    assert!(
        stderr.contains("un-revoke") && stderr.contains(&before.serial),
        "{stderr}"
    );

    // Into an empty directory, compressed (how an existing database is compressed): the
    // state equals the snapshot, and the server reads it with compression off in its
    // configuration.
    let (ok, _, stderr) = payra(&[
        "restore",
        path_str(&file),
        "--data",
        path_str(&fresh),
        "--compress",
    ]);
    assert!(ok, "{stderr}");
    let conf = std::fs::read(fresh.join("conf")).unwrap();
    assert!(
        String::from_utf8_lossy(&conf).contains("use_compression: true"),
        "restored compressed"
    );
    // A restore holds no signed heads (they cover the source's later state).
    let (ok, stdout, stderr) = payra(&[
        "audit",
        "verify",
        "--data",
        path_str(&fresh),
        "--allow-unsigned",
    ]);
    assert!(ok, "{stdout}{stderr}");
    server.config.data_dir = fresh.clone();
    server.start_again().await;
    let restored = exists(&server, &before.serial)
        .await
        .expect("snapshot content restored");
    assert_eq!(
        restored.status,
        proto::CertificateStatus::Valid as i32,
        "as it was at backup time"
    );
    assert!(
        exists(&server, &after.serial).await.is_none(),
        "later changes are not in the snapshot"
    );
    server.stop().await;

    // With --force over the current data: restored, and the old data kept aside.
    let (ok, _, stderr) = payra(&[
        "restore",
        path_str(&file),
        "--data",
        path_str(&data),
        "--force",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("lost by --force"), "{stderr}");
    let kept = std::fs::read_dir(server.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.before-restore-")
        });
    assert!(kept, "the replaced data is kept");
}
