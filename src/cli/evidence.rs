//! `payra evidence show`: a decision's evidence, for disputes.

use payra::client::Credential;

use super::args::*;
use super::connection::*;
use crate::CliResult;

/// `payra evidence`.
pub(crate) async fn evidence(command: EvidenceCommand) -> CliResult {
    match command {
        EvidenceCommand::Show { id, connection } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let evidence = client.evidence(&id).await.map_err(status_message)?;
            println!(
                "{}",
                serde_json::json!({
                    "evidence_id": evidence.evidence_id,
                    "certificate_serial": evidence.certificate_serial,
                    "customer_id": evidence.customer_id,
                    "verdict": evidence.verdict,
                    "tier": evidence.tier,
                    "categories": evidence.categories,
                    "reserved_fen": evidence.reserved_fen,
                    "day": evidence.day,
                    "released": evidence.released,
                    "recorded_at_unix_ms": evidence.recorded_at_unix_ms,
                    "intent_hex": hex::encode(&evidence.intent),
                    "signature_hex": hex::encode(&evidence.signature),
                })
            );
            Ok(())
        }
    }
}
