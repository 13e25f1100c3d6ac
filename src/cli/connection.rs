//! Connecting to a server as a role, and saying what went wrong in words an operator can act on.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use payra::client::{Client, Credential};
use payra::clock::SystemClock;

use super::args::*;
use super::human;
use crate::CliResult;

/// An error from the server in words an operator can act on: the code, payra's message, and
/// what to do next where the code says it.
pub(crate) fn status_message(error: impl Into<payra::client::ClientError>) -> String {
    let error = error.into();
    match error.hint() {
        Some(hint) => format!("{error}\n  next: {hint}"),
        None => error.to_string(),
    }
}

pub(crate) async fn connect(
    connection: &Connection,
    credential: Credential,
) -> Result<Client, String> {
    check_credential_dates(&credential)?;
    let root = connection.certs.join("root.pem");
    if !root.exists() {
        return Err(format!(
            "{} not found: --certs (or PAYRA_CERTS) must name the directory `payra init` wrote, \
             holding root.pem and the role credentials",
            root.display()
        ));
    }
    Client::connect(&connection.server, &root, &credential)
        .await
        .map_err(|e| {
            format!(
                "{e}. Is payra running and listening there? Check --server (or PAYRA_SERVER; \
                 default https://localhost:8443) and that the server's certificate chains to \
                 {}",
                root.display()
            )
        })
}

/// Refuses a client certificate that is not valid now, before the server does: a server
/// drops such a TLS connection, and the client sees only a closed stream.
pub(crate) fn check_credential_dates(credential: &Credential) -> CliResult {
    let Credential::Files { certificate, .. } = credential else {
        return Ok(());
    };
    // A missing or unreadable file is reported when the credential is loaded.
    let Ok(text) = std::fs::read_to_string(certificate) else {
        return Ok(());
    };
    let Ok(block) = pem::parse(&text) else {
        return Ok(());
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(block.contents()) else {
        return Ok(());
    };
    let now_s = payra::clock::Clock::now_s(&SystemClock);
    let validity = parsed.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let next =
        "have an operator issue a new one with `payra issue-client --role ROLE --name NAME` \
                (a device renews with `payra device renew` before its certificate expires, or \
                enrolls again)";
    if now_s >= not_after {
        return Err(format!(
            "the client certificate {} expired at {} ({})\n  next: {next}",
            certificate.display(),
            payra::model::moment(not_after),
            human::relative(not_after - now_s),
        ));
    }
    if now_s < not_before {
        return Err(format!(
            "the client certificate {} is valid only from {}: check this machine's clock",
            certificate.display(),
            payra::model::moment(not_before),
        ));
    }
    Ok(())
}

pub(crate) fn write_secret(path: &Path, contents: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `payra issue-client`: a service or operator credential, key written beside it.
pub(crate) async fn issue_client(
    role: &str,
    name: &str,
    out: Option<std::path::PathBuf>,
    connection: &Connection,
) -> CliResult {
    let client = connect(connection, Credential::role(&connection.certs, "operator")).await?;
    let key = payra::client::DeviceKey::generate();
    let csr = key.csr_der(name).map_err(|e| e.to_string())?;
    let issued = client
        .issue_client_certificate(role, name, csr)
        .await
        .map_err(status_message)?;
    let out = out.unwrap_or(connection.certs.clone());
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let key_path = out.join(format!("{name}.key"));
    write_secret(&key_path, &key.to_pkcs8_pem().map_err(|e| e.to_string())?)?;
    let mut chain = pem::encode(&pem::Pem::new("CERTIFICATE", issued.certificate_der));
    for ca in issued.chain_der {
        chain.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", ca)));
    }
    let cert_path = out.join(format!("{name}.pem"));
    std::fs::write(&cert_path, chain).map_err(|e| e.to_string())?;
    println!("{}", issued.serial);
    eprintln!(
        "issued {role} certificate {} for {name}: {} and {}",
        issued.serial,
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}
