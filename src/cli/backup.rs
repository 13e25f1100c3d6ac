//! `payra backup` and `payra restore`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use payra::client::Credential;
use payra::clock::SystemClock;

use super::args::*;
use super::connection::*;
use crate::CliResult;

pub(crate) async fn backup(out: &Path, connection: &Connection) -> CliResult {
    use payra::store::backup::verify_backup;
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let mut stream = client.create_backup().await.map_err(status_message)?;
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

pub(crate) fn restore(file: &Path, data: &Path, force: bool, compress: bool) -> CliResult {
    use payra::store::backup::{import_backup, plan_restore};
    let plan = plan_restore(file, data).map_err(|e| e.to_string())?;
    let lost: Vec<String> = plan
        .would_unrevoke
        .iter()
        .map(|lost| {
            format!(
                "{} ({} at {})",
                lost.serial,
                lost.reason.cli_name(),
                lost.revoked_at_s
            )
        })
        .collect();
    if !lost.is_empty() && !force {
        return Err(format!(
            "restoring would un-revoke {} certificate(s) revoked after the backup: {}{}; \
             revoke them again after restoring, or pass --force",
            lost.len(),
            lost.iter().take(20).cloned().collect::<Vec<_>>().join(", "),
            if lost.len() > 20 { ", ..." } else { "" }
        ));
    }
    if plan.replaces_database {
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
    import_backup(file, data, compress).map_err(|e| e.to_string())?;
    println!(
        "restored {} entries in {} trees into {} (backup sha256 {})",
        plan.summary.entries,
        plan.summary.trees,
        data.display(),
        plan.summary.sha256
    );
    Ok(())
}
