//! `payra device`: enroll, renew and pay as a phone would (development and support).

use std::path::Path;

use payra::client::{Credential, DeviceKey, ProtoDeviceInfo, Sm2DeviceKey};
use payra::clock::SystemClock;

use super::args::*;
use super::connection::*;
use super::human;
use crate::CliResult;

/// A device directory's key: P-256, or SM2.
pub(crate) enum CliKey {
    P256(DeviceKey),
    Sm2(Sm2DeviceKey),
}

impl CliKey {
    fn generate(algorithm: BenchKeyAlgorithm) -> CliKey {
        match algorithm {
            BenchKeyAlgorithm::P256 => CliKey::P256(DeviceKey::generate()),
            BenchKeyAlgorithm::Sm2 => CliKey::Sm2(Sm2DeviceKey::generate()),
        }
    }

    /// The key in a PKCS#8 PEM file: P-256 or SM2, as the file says.
    fn read(path: &Path) -> Result<CliKey, String> {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(key) = DeviceKey::from_pkcs8_pem(&pem) {
            return Ok(CliKey::P256(key));
        }
        Sm2DeviceKey::from_pkcs8_pem(&pem)
            .map(CliKey::Sm2)
            .map_err(|_| format!("{}: not a PKCS#8 P-256 or SM2 key", path.display()))
    }

    fn csr_der(&self, device: &str) -> Result<Vec<u8>, String> {
        match self {
            CliKey::P256(key) => key.csr_der(device),
            CliKey::Sm2(key) => key.csr_der(device),
        }
        .map_err(|e| e.to_string())
    }

    fn to_pkcs8_pem(&self) -> Result<String, String> {
        match self {
            CliKey::P256(key) => key.to_pkcs8_pem(),
            CliKey::Sm2(key) => key.to_pkcs8_pem(),
        }
        .map_err(|e| e.to_string())
    }

    fn sign_intent(&self, intent_bytes: &[u8]) -> Vec<u8> {
        match self {
            CliKey::P256(key) => key.sign_intent(intent_bytes),
            CliKey::Sm2(key) => key.sign_intent(intent_bytes),
        }
    }

    fn algorithm(&self) -> BenchKeyAlgorithm {
        match self {
            CliKey::P256(_) => BenchKeyAlgorithm::P256,
            CliKey::Sm2(_) => BenchKeyAlgorithm::Sm2,
        }
    }

    fn renewal_proof(
        &self,
        serial: &str,
        csr_der: &[u8],
        now_s: i64,
    ) -> payra::error::Result<payra::wire::proto::RenewalProof> {
        match self {
            CliKey::P256(key) => key.renewal_proof(serial, csr_der, now_s),
            CliKey::Sm2(key) => key.renewal_proof(serial, csr_der, now_s),
        }
    }
}

pub(crate) async fn pay(args: PayArgs) -> CliResult {
    use payra::client::{encode_intent, factor_category, random_nonce, DeviceIdentity};
    use payra::wire::proto;
    let amount_fen = payra::client::parse_amount_fen(&args.amount).map_err(|e| e.to_string())?;
    let key = CliKey::read(&args.device_dir.join("device.key"))?;
    let cert_pem = std::fs::read_to_string(args.device_dir.join("device.pem"))
        .map_err(|e| format!("{}: {e}", args.device_dir.join("device.pem").display()))?;
    let cert = pem::parse(&cert_pem).map_err(|e| format!("device.pem: {e}"))?;
    // `device enroll` keeps the ids beside the key (the certificate names neither); a
    // directory from before that has them in the certificate.
    let identity = match std::fs::read(args.device_dir.join("identity.json")) {
        Ok(json) => serde_json::from_slice::<DeviceIdentity>(&json)
            .map_err(|e| format!("identity.json: {e}"))?,
        Err(_) => DeviceIdentity::from_certificate(cert.contents()).map_err(|e| e.to_string())?,
    };
    let factors = args
        .factors
        .iter()
        .map(|method| {
            factor_category(method)
                .map(|category| proto::Factor {
                    category: category as i32,
                    method: method.clone(),
                })
                .ok_or_else(|| {
                    format!(
                        "unknown factor {method:?}; known: payment_pin, password, sms_otp, otp, \
                         fingerprint, face, and the other names in docs/tiers.md"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let intent = proto::PaymentIntent {
        customer_id: identity.customer_id.clone(),
        device_id: identity.device_id.clone(),
        merchant_id: args.merchant.clone(),
        order_id: args.order.clone(),
        amount_fen,
        currency: "CNY".into(),
        created_at_ms: payra::clock::Clock::now_ms(&SystemClock),
        nonce: random_nonce(),
        scene: args.scene.to_proto(),
    };
    let intent_bytes = encode_intent(&intent);
    let signature = key.sign_intent(&intent_bytes);
    let client = connect(
        &args.connection,
        Credential::role(&args.connection.certs, "service"),
    )
    .await?;
    let answer = client
        .verify_payment(proto::VerifyPaymentRequest {
            intent: intent_bytes,
            signature,
            certificate_serial: identity.serial.clone(),
            transaction: Some(proto::Transaction {
                merchant_id: args.merchant,
                order_id: args.order,
                amount_fen,
                currency: "CNY".into(),
            }),
            factors,
            reserve: args.reserve,
        })
        .await
        .map_err(status_message)?;
    let verdict = proto::Verdict::try_from(answer.verdict)
        .map(|v| v.as_str_name().trim_start_matches("VERDICT_").to_string())
        .unwrap_or_else(|_| "UNKNOWN".into());
    let tier_letter = |tier: i32| {
        proto::Tier::try_from(tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let tier = tier_letter(answer.tier);
    let categories: Vec<String> = answer
        .categories
        .iter()
        .map(|c| {
            proto::FactorCategory::try_from(*c)
                .map(|c| {
                    c.as_str_name()
                        .trim_start_matches("FACTOR_CATEGORY_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    let limit = answer.limit.unwrap_or_default();
    let binding = tier_letter(limit.binding_tier);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "verdict": verdict,
                "reason": answer.reason,
                "tier": tier,
                "categories": categories,
                "limit_fen": limit.limit_fen,
                "used_fen": limit.used_fen,
                "remaining_fen": limit.remaining_fen,
                "fits": limit.fits,
                "reserved": limit.reserved,
                "day": limit.day,
                "binding_tier": binding,
                "evidence_id": answer.evidence_id,
            })
        );
    } else {
        println!("verdict      {verdict}");
        if !answer.reason.is_empty() {
            println!("reason       {}", answer.reason);
        }
        println!("tier         {tier}");
        println!("categories   {}", categories.join(", "));
        println!(
            "limit        {}, used {}, remaining {} (day {}, tier {binding} ceiling binds)",
            human::money(limit.limit_fen),
            human::cny(limit.used_fen),
            human::cny(limit.remaining_fen),
            limit.day
        );
        println!("fits         {}", limit.fits);
        println!("reserved     {}", limit.reserved);
        println!("evidence     {}", answer.evidence_id);
    }
    if verdict == "VERIFIED" {
        Ok(())
    } else {
        Err(format!("payment not verified: {verdict}"))
    }
}

pub(crate) fn cli_device_info(platform: &str) -> ProtoDeviceInfo {
    ProtoDeviceInfo {
        platform: platform.to_string(),
        model: "payra-cli".to_string(),
        os_version: std::env::consts::OS.to_string(),
        app_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Writes a device directory: `device.key` (0600), `device.pem` (certificate and chain),
/// `serial` and `identity.json`. Each file is written beside its final name and renamed over
/// it, so a directory is never left with a key that does not match its certificate.
pub(crate) fn write_device_dir(
    out: &Path,
    key: &CliKey,
    issued: &payra::wire::proto::EnrollResponse,
) -> CliResult {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut chain = pem::encode(&pem::Pem::new(
        "CERTIFICATE",
        issued.certificate_der.clone(),
    ));
    for ca in &issued.chain_der {
        chain.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", ca.clone())));
    }
    let identity = payra::client::DeviceIdentity::from_enrollment(issued);
    let identity = serde_json::to_string_pretty(&identity).map_err(|e| e.to_string())?;
    let key_pem = key.to_pkcs8_pem()?;
    let files = [
        ("device.key", key_pem, true),
        ("device.pem", chain, false),
        ("serial", format!("{}\n", issued.serial), false),
        ("identity.json", identity, false),
    ];
    for (name, contents, _) in &files {
        let staged = out.join(format!("{name}.new"));
        write_secret(&staged, contents)?;
    }
    for (name, _, secret) in &files {
        let staged = out.join(format!("{name}.new"));
        if !secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("{}: {e}", staged.display()))?;
        }
        std::fs::rename(&staged, out.join(name))
            .map_err(|e| format!("{}: {e}", out.join(name).display()))?;
    }
    Ok(())
}

pub(crate) async fn enroll_device(
    connection: &Connection,
    token: &str,
    device: &str,
    out: &Path,
    platform: &str,
    algorithm: BenchKeyAlgorithm,
) -> CliResult {
    let key = CliKey::generate(algorithm);
    let csr = key.csr_der(device)?;
    let client = connect(connection, Credential::None).await?;
    let issued = client
        .enroll(token, csr, device, cli_device_info(platform))
        .await
        .map_err(status_message)?;
    write_device_dir(out, &key, &issued)?;
    println!("{}", issued.serial);
    eprintln!(
        "enrolled {device}: serial {}, valid until {}; key and certificate in {}",
        issued.serial,
        human::time(issued.not_after_unix_s, human::now_s()),
        out.display()
    );
    Ok(())
}

/// `payra device renew`: a new key and certificate for the device in `dir`, over mutual TLS
/// with its current certificate, or with a renewal proof signed by its current key for an SM2
/// device (TLS cannot present an SM2 certificate) or one whose certificate an upstream CA
/// issued; the directory then holds the new ones, of the same algorithm.
pub(crate) async fn renew_device(
    connection: &Connection,
    dir: &Path,
    platform: Option<&str>,
) -> CliResult {
    let identity_path = dir.join("identity.json");
    let device = match std::fs::read(&identity_path) {
        Ok(json) => {
            serde_json::from_slice::<payra::client::DeviceIdentity>(&json)
                .map_err(|e| format!("{}: {e}", identity_path.display()))?
                .device_id
        }
        Err(_) => String::from("device"),
    };
    let current = CliKey::read(&dir.join("device.key"))?;
    let algorithm = current.algorithm();
    let key = CliKey::generate(algorithm);
    let csr = key.csr_der(&device)?;
    // An SM2 certificate, or one from an upstream CA (RA mode), is not one payra's TLS
    // listener accepts: its key signs a renewal proof instead.
    let by_proof =
        algorithm == BenchKeyAlgorithm::Sm2 || !carries_payra_role(&dir.join("device.pem"))?;
    let issued = if by_proof {
        if platform.is_some() {
            return Err(
                "--platform: a renewal by proof keeps the device info on record (the \
                        proof does not cover it)"
                    .into(),
            );
        }
        let serial = std::fs::read_to_string(dir.join("serial"))
            .map_err(|e| format!("{}: {e}", dir.join("serial").display()))?;
        let now_s = payra::clock::Clock::now_s(&SystemClock);
        let proof = current
            .renewal_proof(serial.trim(), &csr, now_s)
            .map_err(|e| e.to_string())?;
        connect(connection, Credential::None)
            .await?
            .renew_with_proof(csr, None, proof)
            .await
    } else {
        connect(connection, Credential::device(dir))
            .await?
            .renew(csr, platform.map(cli_device_info))
            .await
    }
    .map_err(status_message)?;
    write_device_dir(dir, &key, &issued)?;
    println!("{}", issued.serial);
    eprintln!(
        "renewed {}: new serial {}, valid until {}; the previous certificate is superseded; \
         new key and certificate in {}",
        issued.device_id,
        issued.serial,
        human::time(issued.not_after_unix_s, human::now_s()),
        dir.display()
    );
    Ok(())
}

/// Whether the certificate in `path` (PEM) names a payra role (`urn:payra:role:`), as payra's
/// own device certificates do and an upstream CA's do not.
fn carries_payra_role(path: &Path) -> Result<bool, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = pem::parse(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    Ok(names.iter().any(|name| {
        matches!(name, x509_parser::extensions::GeneralName::URI(uri)
            if uri.starts_with(payra::ca::ROLE_URI_PREFIX))
    }))
}

/// `payra device`.
pub(crate) async fn device(command: DeviceCommand) -> CliResult {
    match command {
        DeviceCommand::Enroll {
            token,
            device,
            out,
            platform,
            key_algorithm,
            connection,
        } => enroll_device(&connection, &token, &device, &out, &platform, key_algorithm).await,
        DeviceCommand::Renew {
            device_dir,
            platform,
            connection,
        } => renew_device(&connection, &device_dir, platform.as_deref()).await,
        DeviceCommand::Pay(args) => pay(args).await,
    }
}
