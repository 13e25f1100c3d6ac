//! `payra retention run`: the retention pass, with its progress.

use payra::client::Credential;

use super::args::*;
use super::connection::*;
use crate::CliResult;

/// `payra retention`.
pub(crate) async fn retention(command: RetentionCommand) -> CliResult {
    match command {
        RetentionCommand::Run { connection } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let mut stream = client.run_retention().await.map_err(status_message)?;
            while let Some(progress) = stream.message().await.map_err(status_message)? {
                eprint!(
                    "\rpurged: {} nonces, {} tokens, {} certificate records, {} ledger buckets, {} releases",
                    progress.nonces_purged,
                    progress.tokens_purged,
                    progress.certificates_purged,
                    progress.ledger_buckets_purged,
                    progress.releases_purged
                );
                if progress.done {
                    eprintln!();
                    println!(
                        "{}",
                        serde_json::json!({
                            "nonces_purged": progress.nonces_purged,
                            "tokens_purged": progress.tokens_purged,
                            "certificates_purged": progress.certificates_purged,
                            "ledger_buckets_purged": progress.ledger_buckets_purged,
                            "releases_purged": progress.releases_purged,
                        })
                    );
                }
            }
            Ok(())
        }
    }
}
