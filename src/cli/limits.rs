//! `payra limits show`.

use payra::client::Credential;

use super::args::*;
use super::connection::*;
use super::human;
use crate::CliResult;

/// `payra limits show`: today's ledger for one customer.
pub(crate) async fn limits_show(connection: &Connection, customer: &str, json: bool) -> CliResult {
    use payra::wire::proto;
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let answer = client.limits(customer).await.map_err(status_message)?;
    let letter = |tier: i32| {
        proto::Tier::try_from(tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_string())
            .unwrap_or_else(|_| "?".into())
    };
    if json {
        let tiers: Vec<_> = answer
            .tiers
            .iter()
            .map(|status| {
                serde_json::json!({
                    "tier": letter(status.tier),
                    "binding_tier": letter(status.binding_tier),
                    "limit_fen": status.limit_fen,
                    "used_fen": status.used_fen,
                    "remaining_fen": status.remaining_fen,
                    "ceilings": status.ceilings.iter().map(|c| serde_json::json!({
                        "tier": letter(c.tier),
                        "counts": c.counts.iter().map(|t| letter(*t)).collect::<Vec<_>>(),
                        "limit_fen": c.limit_fen,
                        "used_fen": c.used_fen,
                        "remaining_fen": c.remaining_fen,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "customer_id": answer.customer_id,
                "day": answer.day,
                "has_agreement": answer.has_agreement,
                "tiers": tiers,
            })
        );
        return Ok(());
    }
    println!(
        "customer {} on {} (ledger day){}",
        answer.customer_id,
        answer.day,
        if answer.has_agreement {
            ", agreed tier-A limit set"
        } else {
            ", no agreed limit (tier A gets the standard figure)"
        }
    );
    println!(
        "{:<6} {:<10} {:>22} {:>22} {:>22}",
        "TIER", "CEILING", "LIMIT", "USED", "LEFT"
    );
    for status in &answer.tiers {
        for ceiling in &status.ceilings {
            let counts: Vec<String> = ceiling.counts.iter().map(|t| letter(*t)).collect();
            let binds = if ceiling.tier == status.binding_tier {
                "  <- binds"
            } else {
                ""
            };
            println!(
                "{:<6} {:<10} {:>22} {:>22} {:>22}{binds}",
                letter(status.tier),
                counts.join("+"),
                human::cny(ceiling.limit_fen),
                human::cny(ceiling.used_fen),
                human::cny(ceiling.remaining_fen)
            );
        }
    }
    Ok(())
}

/// `payra limits`.
pub(crate) async fn limits(command: LimitsCommand) -> CliResult {
    match command {
        LimitsCommand::Show {
            customer,
            json,
            connection,
        } => limits_show(&connection, &customer, json).await,
        LimitsCommand::Set {
            customer,
            amount,
            connection,
        } => {
            let fen = payra::client::parse_amount_fen(&amount).map_err(|e| e.to_string())?;
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            client
                .set_agreed_limit(&customer, fen)
                .await
                .map_err(status_message)?;
            println!(
                "tier-A daily limit of {customer} set to {}",
                human::money(fen)
            );
            Ok(())
        }
    }
}
