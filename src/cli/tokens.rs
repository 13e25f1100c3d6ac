//! `payra token`: enrollment tokens, as the payment service.

use payra::client::Credential;

use super::args::*;
use super::connection::*;
use super::human;
use crate::CliResult;

/// `payra token`.
pub(crate) async fn token(command: TokenCommand) -> CliResult {
    match command {
        TokenCommand::Create {
            customer,
            ttl_s,
            json,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "service")).await?;
            let token = client
                .create_enrollment_token(&customer, ttl_s)
                .await
                .map_err(status_message)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"token": token.token, "expires_at_unix_s": token.expires_at_unix_s})
                );
            } else {
                println!("{}", token.token);
                eprintln!(
                    "expires at {}",
                    human::time(token.expires_at_unix_s, human::now_s())
                );
            }
            Ok(())
        }
    }
}
