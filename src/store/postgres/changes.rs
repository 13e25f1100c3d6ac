//! What other payra processes changed: every transaction that changes a certificate's
//! revocation state, removes certificates or revokes a client certificate sends a
//! notification (`NOTIFY payra_changes`, delivered when it commits); each process listens on
//! a connection of its own and hands the serials to the RA, which drops them from its
//! certificate cache (the next lookup reads the database). After a lost connection it says
//! "anything may have changed" once the new one listens, and the RA empties the cache.
//!
//! Notifications arrive a few milliseconds after the commit. What depends on them is the
//! status answers, OCSP and CRL of the other processes; a verification re-reads the
//! certificate inside its own transaction and has no such window.

use std::time::Duration;

use deadpool_postgres::Transaction;
use tokio_postgres::AsyncMessage;

use super::db_error;
use crate::error::Result;
use crate::model::Serial;
use crate::store::StoreChange;

/// The notification channel.
pub const CHANNEL: &str = "payra_changes";

/// Serials per notification: 200 × 41 characters stays under PostgreSQL's 8000 bytes.
const MAX_SERIALS: usize = 180;

/// Tells the other processes, at commit, that `serials` (device certificates, or client
/// certificates with `client`) changed.
pub(super) async fn notify(tx: &Transaction<'_>, serials: &[&Serial], client: bool) -> Result<()> {
    // Notifications of at most about 200 serials each (PostgreSQL takes 8000 bytes): a bulk
    // revocation or a retention batch names every serial, never "reload everything".
    for chunk in serials.chunks(MAX_SERIALS) {
        let mut payload = String::from(if client { "k:" } else { "c:" });
        for (i, serial) in chunk.iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(&serial.to_hex());
        }
        tx.execute(
            &super::prepared_tx(tx, "SELECT pg_notify($1, $2)").await?,
            &[&CHANNEL, &payload],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Tells the other processes, at commit, that an agreed limit changed.
pub(super) async fn notify_limits(tx: &Transaction<'_>) -> Result<()> {
    tx.execute(
        &super::prepared_tx(tx, "SELECT pg_notify($1, $2)").await?,
        &[&CHANNEL, &"l:"],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Parses a notification's payload.
fn parse(payload: &str) -> StoreChange {
    let serials = |list: &str| -> Option<Vec<Serial>> {
        list.split(',')
            .map(|hex| Serial::parse("serial", hex).ok())
            .collect()
    };
    match payload.split_once(':') {
        Some(("c", list)) => {
            serials(list).map_or(StoreChange::Everything, StoreChange::Certificates)
        }
        Some(("k", list)) => {
            serials(list).map_or(StoreChange::Everything, StoreChange::ClientCertificates)
        }
        Some(("l", _)) => StoreChange::AgreedLimits,
        _ => StoreChange::Everything,
    }
}

/// Connects with `config` and `tls` and listens until the connection ends; `listening` is
/// told once the LISTEN took effect.
async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    out: &tokio::sync::mpsc::UnboundedSender<StoreChange>,
    listening: &mut Option<std::sync::mpsc::SyncSender<Result<()>>>,
) -> Result<()>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await.map_err(db_error)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the change listener's connection failed");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(db_error)?;
    match listening.take() {
        Some(first) => {
            let _ = first.send(Ok(()));
        }
        // A later connection: what was sent while none listened is lost.
        None => {
            let _ = out.send(StoreChange::Everything);
        }
    }
    while let Some(payload) = rx.recv().await {
        if out.send(parse(&payload)).is_err() {
            break;
        }
    }
    driver.abort();
    Ok(())
}

/// Listens for changes for as long as `out` has a reader, reconnecting after a second when
/// the connection is lost.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: Option<rustls::ClientConfig>,
    out: tokio::sync::mpsc::UnboundedSender<StoreChange>,
    listening: std::sync::mpsc::SyncSender<Result<()>>,
) {
    let mut listening = Some(listening);
    while !out.is_closed() {
        let result = match &tls {
            Some(tls) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                listen_once(&config, connector, &out, &mut listening).await
            }
            None => listen_once(&config, tokio_postgres::NoTls, &out, &mut listening).await,
        };
        if let Err(e) = result {
            match listening.take() {
                Some(first) => {
                    let _ = first.send(Err(e));
                    return;
                }
                None => tracing::warn!(error = %e, "listening for changes failed; retrying"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_serials_or_everything() {
        let serial = Serial::random();
        assert_eq!(
            parse(&format!("c:{}", serial.to_hex())),
            StoreChange::Certificates(vec![serial.clone()])
        );
        assert_eq!(
            parse(&format!("k:{}", serial.to_hex())),
            StoreChange::ClientCertificates(vec![serial])
        );
        assert_eq!(parse("*"), StoreChange::Everything);
        assert_eq!(parse("l:"), StoreChange::AgreedLimits);
        assert_eq!(parse("c:not-hex"), StoreChange::Everything);
    }
}
