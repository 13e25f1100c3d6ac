//! `payra certs` and `payra revoke`: finding, showing and revoking certificates.

use payra::client::Credential;

use super::args::*;
use super::connection::*;
use super::human;
use crate::CliResult;

pub(crate) async fn revoke(args: RevokeArgs) -> CliResult {
    use payra::wire::proto;
    let client = connect(
        &args.connection,
        Credential::role(&args.connection.certs, "operator"),
    )
    .await?;
    let reason = proto::RevocationReason::try_from(args.reason.to_proto())
        .map_err(|_| "not a revocation reason payra knows".to_string())?;
    let response = if let Some(serial) = args.serial {
        if args.dry_run {
            return Err("--dry-run applies to --device and --customer".into());
        }
        client.revoke_certificate(&serial, reason).await
    } else if let Some(device_id) = args.device {
        client.revoke_device(&device_id, reason, args.dry_run).await
    } else if let Some(customer_id) = args.customer {
        client
            .revoke_customer(&customer_id, reason, args.dry_run)
            .await
    } else {
        return Err("name a serial, --device or --customer".into());
    };
    let response = response.map_err(status_message)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "revoked_serials": response.revoked_serials,
                "revoked_at_unix_s": response.revoked_at_unix_s,
                "dry_run": response.dry_run,
                "note": response.note,
            })
        );
        return Ok(());
    }
    if !response.note.is_empty() {
        println!("{}", response.note);
    }
    let verb = if response.dry_run {
        "would revoke"
    } else {
        "revoked"
    };
    if response.revoked_serials.is_empty() {
        println!("nothing to revoke: no live certificates matched");
    }
    for serial in &response.revoked_serials {
        println!("{verb} {serial}");
    }
    Ok(())
}

pub(crate) fn status_name(status: i32) -> String {
    payra::wire::proto::CertificateStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CERTIFICATE_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
pub(crate) fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

pub(crate) fn print_list(
    records: &[payra::wire::proto::CertificateRecord],
    next: &str,
    output: ListOutput,
) {
    match output {
        ListOutput::Json => {
            let items: Vec<_> = records.iter().map(record_json).collect();
            println!(
                "{}",
                serde_json::json!({"certificates": items, "next_page_token": next})
            );
            return;
        }
        ListOutput::Csv => {
            println!("serial,customer_id,device_id,status,not_before_unix_s,not_after_unix_s,revoked_at_unix_s,revocation_reason,attestation");
            for record in records {
                let reason = if record.revoked_at_unix_s != 0 {
                    reason_name(record.revocation_reason)
                } else {
                    String::new()
                };
                let row = [
                    record.serial.clone(),
                    record.customer_id.clone(),
                    record.device_id.clone(),
                    status_name(record.status),
                    record.not_before_unix_s.to_string(),
                    record.not_after_unix_s.to_string(),
                    record.revoked_at_unix_s.to_string(),
                    reason,
                    attestation_word(record).to_string(),
                ];
                let row: Vec<String> = row.iter().map(|v| csv_field(v)).collect();
                println!("{}", row.join(","));
            }
            if !next.is_empty() {
                eprintln!("next page: --page-token {next}");
            }
            return;
        }
        ListOutput::Table => {}
    }
    let now = human::now_s();
    println!(
        "{:<34} {:<20} {:<20} {:<12} {:<14} NOT AFTER",
        "SERIAL", "CUSTOMER", "DEVICE", "STATUS", "ATTESTATION"
    );
    for record in records {
        println!(
            "{:<34} {:<20} {:<20} {:<12} {:<14} {}",
            record.serial,
            record.customer_id,
            record.device_id,
            status_name(record.status),
            attestation_word(record),
            human::time(record.not_after_unix_s, now)
        );
    }
    if !next.is_empty() {
        println!("next page: --page-token {next}");
    }
}

pub(crate) fn reason_name(reason: i32) -> String {
    payra::wire::proto::RevocationReason::try_from(reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("REVOCATION_REASON_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The stable JSON form of a record for scripts.
pub(crate) fn record_json(record: &payra::wire::proto::CertificateRecord) -> serde_json::Value {
    let status = status_name(record.status);
    let reason = reason_name(record.revocation_reason);
    serde_json::json!({
            "serial": record.serial,
            "customer_id": record.customer_id,
            "device_id": record.device_id,
            "subject": record.subject,
            "key_algorithm": record.key_algorithm,
            "issued_upstream": record.issued_upstream,
            "status": status,
            "not_before_unix_s": record.not_before_unix_s,
            "not_after_unix_s": record.not_after_unix_s,
            "issued_at_unix_s": record.issued_at_unix_s,
            "revoked_at_unix_s": record.revoked_at_unix_s,
            "revocation_reason": if record.revoked_at_unix_s != 0 { Some(reason.clone()) } else { None },
            "renewed_from_serial": record.renewed_from_serial,
            "superseded_by_serial": record.superseded_by_serial,
            "attestation": record.attestation.as_ref().map(|a| serde_json::json!({
                "platform": a.platform,
                "security_level": a.security_level,
                "boot_state": a.boot_state,
                "device_locked": a.device_locked,
                "root": a.root,
                "root_key_sha256": a.root_key_sha256,
                "apps": a.apps,
                "attested_at_unix_s": a.attested_at_unix_s,
                "tier_a_eligible": a.tier_a_eligible,
                "policy_note": a.policy_note,
                "chain_serials": a.chain_serials,
            })),
    })
}

/// One word for a record's attestation: `none`, or the security level.
fn attestation_word(record: &payra::wire::proto::CertificateRecord) -> &str {
    record
        .attestation
        .as_ref()
        .map_or("none", |a| a.security_level.as_str())
}

pub(crate) fn print_record(record: &payra::wire::proto::CertificateRecord, json: bool) {
    let status = status_name(record.status);
    let reason = reason_name(record.revocation_reason);
    if json {
        println!("{}", record_json(record));
        return;
    }
    println!("serial       {}", record.serial);
    println!("customer     {}", record.customer_id);
    println!("device       {}", record.device_id);
    println!("subject      {}", record.subject);
    if !record.key_algorithm.is_empty() {
        println!("key          {}", record.key_algorithm);
    }
    if record.issued_upstream {
        println!("issuer       the upstream CA (RA mode)");
    }
    println!("status       {status}");
    let now = human::now_s();
    println!(
        "not before   {}",
        human::time(record.not_before_unix_s, now)
    );
    println!("not after    {}", human::time(record.not_after_unix_s, now));
    println!("issued at    {}", human::time(record.issued_at_unix_s, now));
    if !record.subscriber_ref.is_empty() {
        println!("subscriber   {}", record.subscriber_ref);
    }
    if record.revoked_at_unix_s != 0 {
        println!(
            "revoked at   {}",
            human::time(record.revoked_at_unix_s, now)
        );
        println!("reason       {reason}");
    }
    match &record.attestation {
        None => println!("attestation  none"),
        Some(a) => {
            let boot = if a.boot_state.is_empty() {
                String::new()
            } else {
                format!(
                    ", boot {}, {}",
                    a.boot_state,
                    if a.device_locked {
                        "locked"
                    } else {
                        "unlocked"
                    }
                )
            };
            println!(
                "attestation  {} {}{boot}, root {}",
                a.platform, a.security_level, a.root
            );
            if a.tier_a_eligible {
                println!("tier A       eligible");
            } else {
                println!("tier A       not eligible: {}", a.policy_note);
            }
        }
    }
}

/// `payra certs`.
pub(crate) async fn certs(command: CertsCommand) -> CliResult {
    match command {
        CertsCommand::Show {
            serial,
            json,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let record = client.certificate(&serial).await.map_err(status_message)?;
            print_record(&record, json);
            Ok(())
        }
        CertsCommand::UpstreamPending {
            retry,
            json,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let answer = client
                .list_upstream_revocations(retry)
                .await
                .map_err(status_message)?;
            print_upstream_pending(&answer, json);
            if answer.pending.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} revocation(s) not confirmed by the upstream CA yet",
                    answer.pending.len()
                ))
            }
        }
        CertsCommand::List {
            customer,
            device,
            status,
            expiring_before,
            page_size,
            page_token,
            attestation,
            attested_by,
            json,
            output,
            connection,
        } => {
            let client =
                connect(&connection, Credential::role(&connection.certs, "operator")).await?;
            let mut request = payra::wire::proto::ListCertificatesRequest {
                customer_id: customer.unwrap_or_default(),
                device_id: device.unwrap_or_default(),
                status: status.map_or(0, StatusFilter::to_proto),
                expiring_before_unix_s: expiring_before.unwrap_or(0),
                page_size: page_size.unwrap_or(0),
                page_token: page_token.unwrap_or_default(),
                attestation: attestation.unwrap_or_default(),
                attested_by_serial: attested_by.unwrap_or_default(),
            };
            let mut records = Vec::new();
            let next = loop {
                let page = client
                    .list_certificates(request.clone())
                    .await
                    .map_err(status_message)?;
                records.extend(page.certificates);
                if page.next_page_token.is_empty() || page_size.is_some() {
                    break page.next_page_token;
                }
                request.page_token = page.next_page_token;
            };
            print_list(
                &records,
                &next,
                if json { ListOutput::Json } else { output },
            );
            Ok(())
        }
    }
}

fn print_upstream_pending(
    answer: &payra::wire::proto::ListUpstreamRevocationsResponse,
    json: bool,
) {
    if json {
        let pending: Vec<serde_json::Value> = answer
            .pending
            .iter()
            .map(|p| {
                serde_json::json!({
                    "serial": p.serial,
                    "reason": reason_name(p.reason),
                    "revoked_at_unix_s": p.revoked_at_unix_s,
                    "attempts": p.attempts,
                    "last_attempt_unix_s": p.last_attempt_unix_s,
                    "last_error": p.last_error,
                    "orphan": p.orphan,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "upstream": answer.upstream,
                "crl_url": answer.crl_url,
                "ocsp_url": answer.ocsp_url,
                "pending": pending,
            })
        );
        return;
    }
    if answer.upstream.is_empty() {
        println!("local mode: payra's own CA signs device certificates; nothing goes upstream");
        return;
    }
    println!("upstream     {}", answer.upstream);
    if answer.crl_url.is_empty() && answer.ocsp_url.is_empty() {
        println!("status       payra's own view (the upstream publishes none payra knows of)");
    } else {
        println!(
            "status       CRL {:?}, OCSP {:?}",
            answer.crl_url, answer.ocsp_url
        );
    }
    println!("pending      {}", answer.pending.len());
    let now = human::now_s();
    for p in &answer.pending {
        let what = if p.orphan {
            "orphan".to_string()
        } else {
            reason_name(p.reason)
        };
        let last = if p.attempts == 0 {
            "not tried yet".to_string()
        } else {
            format!(
                "{} attempt(s), last {}: {}",
                p.attempts,
                human::time(p.last_attempt_unix_s, now),
                p.last_error
            )
        };
        println!(
            "{}  {what}  revoked {}  {last}",
            p.serial,
            human::time(p.revoked_at_unix_s, now)
        );
    }
}

/// `payra unhold`: a certificate on hold released.
pub(crate) async fn unhold(serial: String, json: bool, connection: &Connection) -> CliResult {
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let record = client
        .unhold_certificate(&serial)
        .await
        .map_err(status_message)?;
    print_record(&record, json);
    Ok(())
}
