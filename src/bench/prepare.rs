//! Before a run: devices enrolled, intents presigned, OCSP requests built, one set of work
//! per worker.

use std::sync::Arc;

use crate::client::{
    encode_intent, random_nonce, Client, Credential, DeviceIdentity, DeviceKey, Sm2DeviceKey,
};
use crate::error::{Error, Result};
use crate::model::KeyAlgorithm;
use crate::wire::proto;

use super::*;

/// A benchmark device's key: P-256 or SM2, as `--key-algorithm` says.
pub(super) enum BenchKey {
    P256(DeviceKey),
    Sm2(Sm2DeviceKey),
}

impl BenchKey {
    pub(super) fn generate(algorithm: KeyAlgorithm) -> BenchKey {
        match algorithm {
            KeyAlgorithm::P256 => BenchKey::P256(DeviceKey::generate()),
            KeyAlgorithm::Sm2 => BenchKey::Sm2(Sm2DeviceKey::generate()),
        }
    }

    pub(super) fn csr_der(&self, device: &str) -> Result<Vec<u8>> {
        match self {
            BenchKey::P256(key) => key.csr_der(device),
            BenchKey::Sm2(key) => key.csr_der(device),
        }
    }
}

/// Enrolls a fresh device for `customer`; returns its key and identity.
pub(super) async fn enroll_device(
    settings: &BenchSettings,
    service: &Client,
    customer: &str,
    device: &str,
) -> Result<(BenchKey, DeviceIdentity, Vec<u8>)> {
    let token = service
        .create_enrollment_token(customer, 0)
        .await
        .map_err(status_error)?
        .token;
    let key = BenchKey::generate(settings.key_algorithm);
    let phone = connect(settings, Credential::None).await?;
    let issued = phone
        .enroll(
            &token,
            key.csr_der(device)?,
            device,
            proto::DeviceInfo::default(),
        )
        .await
        .map_err(status_error)?;
    let identity = DeviceIdentity::from_enrollment(&issued);
    Ok((key, identity, issued.certificate_der))
}

/// A DER OCSP request (SHA-1 CertID, no nonce) for `certificate` issued by `issuer`.
pub(super) fn ocsp_request(issuer_der: &[u8], certificate_der: &[u8]) -> Result<Vec<u8>> {
    use der::{Decode, Encode};
    use sha1::{Digest, Sha1};
    let issuer = x509_cert::Certificate::from_der(issuer_der)
        .map_err(|e| Error::internal(format!("issuer: {e}")))?;
    let cert = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| Error::internal(format!("certificate: {e}")))?;
    let name = issuer
        .tbs_certificate
        .subject
        .to_der()
        .map_err(|e| Error::internal(format!("issuer name: {e}")))?;
    let key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let request = x509_ocsp::OcspRequest {
        tbs_request: x509_ocsp::TbsRequest {
            version: Default::default(),
            requestor_name: None,
            request_list: vec![x509_ocsp::Request {
                req_cert: x509_ocsp::CertId {
                    hash_algorithm: spki::AlgorithmIdentifierOwned {
                        oid: const_oid::db::rfc5912::ID_SHA_1,
                        parameters: None,
                    },
                    issuer_name_hash: der::asn1::OctetString::new(Sha1::digest(&name).to_vec())
                        .map_err(|e| Error::internal(e.to_string()))?,
                    issuer_key_hash: der::asn1::OctetString::new(Sha1::digest(key).to_vec())
                        .map_err(|e| Error::internal(e.to_string()))?,
                    serial_number: cert.tbs_certificate.serial_number.clone(),
                },
                single_request_extensions: None,
            }],
            request_extensions: None,
        },
        optional_signature: None,
    };
    request
        .to_der()
        .map_err(|e| Error::internal(format!("OCSP request: {e}")))
}

/// Pre-signed intents are sized for at most this closed-loop rate (twice the raw verify rate of
/// a 2-core machine); `--rate` or `--max-requests` size them otherwise.
const MAX_CLOSED_LOOP_VERIFY_RATE: f64 = 40_000.0;
/// Enrollments (a token and a fresh key each, made before the run) are sized for at most this
/// closed-loop rate, P-256 and SM2: about twice what this 2-core machine reaches.
const MAX_CLOSED_LOOP_ENROLL_RATE: f64 = 20_000.0;
const MAX_CLOSED_LOOP_ENROLL_RATE_SM2: f64 = 5_000.0;
/// Upper bound on prepared enrollments (a token, a key's CSR and a device id, about 400
/// bytes each, and some 50 µs of set-up each for P-256).
const MAX_ENROLLMENTS: u64 = 300_000;
/// Upper bound on pre-signed intents (about 400 bytes each).
const MAX_PRESIGNED: u64 = 500_000;

/// Builds `count` VerifyPayment requests for one device, each a fresh intent with its own
/// nonce, signed exactly as docs/payment-signature.md says a device signs: with ring for
/// P-256, with the sm2 crate for SM2.
pub(super) fn presign(
    key: &BenchKey,
    identity: &DeviceIdentity,
    count: usize,
    reserve: bool,
) -> Result<Vec<proto::VerifyPaymentRequest>> {
    let key = match key {
        BenchKey::Sm2(key) => {
            return presign_with(identity, count, reserve, |bytes| Ok(key.sign_intent(bytes)))
        }
        BenchKey::P256(key) => key,
    };
    let signer = ring_signer(key.secret())?;
    presign_with(identity, count, reserve, |bytes| ring_sign(&signer, bytes))
}

/// A P-256 device key loaded into ring, which signs several times faster than p256.
fn ring_signer(secret: &p256::SecretKey) -> Result<ring::signature::EcdsaKeyPair> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let public =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &secret.to_bytes(),
        public.as_bytes(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| Error::internal(format!("loading the device key into ring: {e}")))
}

/// A payment signature over `intent` bytes, as docs/payment-signature.md says.
fn ring_sign(signer: &ring::signature::EcdsaKeyPair, intent: &[u8]) -> Result<Vec<u8>> {
    signer
        .sign(
            &ring::rand::SystemRandom::new(),
            &crate::ra::signature::signed_message(intent),
        )
        .map(|signature| signature.as_ref().to_vec())
        .map_err(|e| Error::internal(format!("signing: {e}")))
}

/// A request for each device of `devices` (indexes into the population `payra bench
/// populate` wrote), each device's key loaded into `signers` once.
fn presign_population(
    signers: &mut std::collections::HashMap<u64, ring::signature::EcdsaKeyPair>,
    devices: &[u64],
    reserve: bool,
) -> Result<Vec<proto::VerifyPaymentRequest>> {
    devices
        .iter()
        .map(|&i| {
            let signer = match signers.entry(i) {
                std::collections::hash_map::Entry::Occupied(found) => found.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(ring_signer(&population::secret_key(i))?)
                }
            };
            let identity = DeviceIdentity {
                customer_id: population::customer(i),
                device_id: population::device(i),
                serial: population::serial(i).to_hex(),
            };
            presign_with(&identity, 1, reserve, |bytes| ring_sign(signer, bytes))?
                .pop()
                .ok_or_else(|| Error::internal("nothing signed"))
        })
        .collect()
}

/// `work` applied to each of `items`, on two threads (the server is idle meanwhile), each
/// with its own scratch state; the results in the items' order.
async fn on_two_threads<T, S, R>(
    items: Vec<T>,
    work: impl Fn(&mut S, &T) -> Result<R> + Send + Sync + 'static,
) -> Result<Vec<R>>
where
    T: Send + Sync + 'static,
    S: Default,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let half = items.len().div_ceil(2).max(1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = items
                .chunks(half)
                .map(|part| {
                    let work = &work;
                    scope.spawn(move || {
                        let mut scratch = S::default();
                        part.iter()
                            .map(|item| work(&mut scratch, item))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut all = Vec::new();
            for part in parts {
                all.extend(
                    part.join()
                        .map_err(|_| Error::internal("signing thread panicked"))??,
                );
            }
            Ok(all)
        })
    })
    .await
    .map_err(|e| Error::internal(format!("signing intents: {e}")))?
}

/// [`presign`] with the device's signature over intent bytes made by `sign`.
fn presign_with(
    identity: &DeviceIdentity,
    count: usize,
    reserve: bool,
    sign: impl Fn(&[u8]) -> Result<Vec<u8>>,
) -> Result<Vec<proto::VerifyPaymentRequest>> {
    let amount_fen = if reserve { 1 } else { 100 };
    let now_ms = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    (0..count)
        .map(|n| {
            let intent = proto::PaymentIntent {
                customer_id: identity.customer_id.clone(),
                device_id: identity.device_id.clone(),
                merchant_id: "bench-merchant".into(),
                order_id: format!("order-{n}"),
                amount_fen,
                currency: "CNY".into(),
                created_at_ms: now_ms,
                nonce: random_nonce(),
                scene: proto::Scene::InApp as i32,
            };
            let bytes = encode_intent(&intent);
            let signature = sign(&bytes)?;
            Ok(proto::VerifyPaymentRequest {
                signature,
                intent: bytes,
                certificate_serial: identity.serial.clone(),
                transaction: Some(proto::Transaction {
                    merchant_id: intent.merchant_id,
                    order_id: intent.order_id,
                    amount_fen,
                    currency: "CNY".into(),
                }),
                factors: if reserve {
                    Vec::new()
                } else {
                    vec![proto::Factor {
                        category: proto::FactorCategory::Knowledge as i32,
                        method: "payment_pin".into(),
                    }]
                },
                reserve,
            })
        })
        .collect()
}

pub(super) async fn prepare(settings: &BenchSettings) -> Result<Vec<Work>> {
    let service = connect(settings, Credential::role(&settings.certs, "service")).await?;
    let mut work = Vec::with_capacity(settings.concurrency);
    match settings.scenario {
        Scenario::Verify => {
            // Enough signed intents for the whole run at the expected pace (or the request
            // budget, if smaller); a worker that runs out stops, which the report shows.
            let seconds = (settings.duration + settings.warmup).as_secs_f64();
            // Batches share the transport's cost, so they may go faster.
            let closed_loop =
                MAX_CLOSED_LOOP_VERIFY_RATE * if settings.batch > 1 { 1.5 } else { 1.0 };
            let pace = settings.rate.unwrap_or(closed_loop);
            let total = ((pace * seconds * 1.1) as u64)
                .min(settings.max_requests)
                .min(MAX_PRESIGNED);
            // At least one full batch each, so every call carries `batch` payments.
            let per_worker =
                (total / settings.concurrency as u64).max(settings.batch as u64) as usize;
            let reserve = settings.reserve;
            let signed = match settings.population {
                Some(size) => {
                    let chooser = population::Chooser::new(size, settings.skew)
                        .map_err(|e| Error::invalid("population", e))?;
                    let mut rng = rand::thread_rng();
                    let picks: Vec<Vec<u64>> = (0..settings.concurrency)
                        .map(|_| (0..per_worker).map(|_| chooser.pick(&mut rng)).collect())
                        .collect();
                    on_two_threads(picks, move |signers, devices| {
                        presign_population(signers, devices, reserve)
                    })
                    .await?
                }
                None => {
                    let mut devices = Vec::with_capacity(settings.concurrency);
                    for worker in 0..settings.concurrency {
                        let customer = format!("bench-{}-{worker}", random_suffix());
                        let phone = format!("{customer}-phone");
                        let (key, identity, _) =
                            enroll_device(settings, &service, &customer, &phone).await?;
                        devices.push((key, identity));
                    }
                    on_two_threads(devices, move |_: &mut (), (key, identity)| {
                        presign(key, identity, per_worker, reserve)
                    })
                    .await?
                }
            };
            // A payment service multiplexes its calls over a few HTTP/2 connections.
            let mut clients = Vec::new();
            for _ in 0..settings.connections.clamp(1, settings.concurrency) {
                clients.push(
                    Caller::connect(settings, Credential::role(&settings.certs, "service")).await?,
                );
            }
            for (i, requests) in signed.into_iter().enumerate() {
                work.push(Work::Verify {
                    client: clients[i % clients.len()].clone(),
                    requests,
                    batch: settings.batch,
                });
            }
        }
        Scenario::Enroll => {
            // Enough for the whole run at the expected pace (or the request budget, if
            // smaller); a worker that runs out stops, which the report shows.
            let seconds = (settings.duration + settings.warmup).as_secs_f64();
            let pace = match settings.key_algorithm {
                KeyAlgorithm::P256 => MAX_CLOSED_LOOP_ENROLL_RATE,
                KeyAlgorithm::Sm2 => MAX_CLOSED_LOOP_ENROLL_RATE_SM2,
            };
            let total = ((pace * seconds * 1.2) as u64)
                .min(settings.max_requests)
                .min(MAX_ENROLLMENTS);
            let per_worker = (total / settings.concurrency as u64).max(1);
            // Every enrollment is a phone of its own: its own key, CSR and device id, as in
            // the field (a key enrolled again is checked against all its certificates).
            let run = random_suffix();
            let algorithm = settings.key_algorithm;
            let indexes: Vec<u64> = (0..settings.concurrency as u64 * per_worker).collect();
            let mut phones = on_two_threads(indexes, move |_: &mut (), n| {
                let device = format!("bench-{run}-{n}");
                Ok((BenchKey::generate(algorithm).csr_der(&device)?, device))
            })
            .await?
            .into_iter();
            // The workers' tokens are created concurrently, as many calls in flight as the
            // run will have, so that a large run does not spend minutes on its set-up.
            let mut minting = tokio::task::JoinSet::new();
            for _ in 0..settings.concurrency {
                let service = service.clone();
                minting.spawn(async move {
                    let mut tokens = Vec::with_capacity(per_worker as usize);
                    for _ in 0..per_worker {
                        tokens.push(
                            service
                                .create_enrollment_token("bench-enroll", 0)
                                .await
                                .map_err(status_error)?
                                .token,
                        );
                    }
                    Ok::<_, Error>(tokens)
                });
            }
            let mut minted = Vec::with_capacity(settings.concurrency);
            while let Some(tokens) = minting.join_next().await {
                minted.push(
                    tokens.map_err(|e| Error::internal(format!("token task failed: {e}")))??,
                );
            }
            for tokens in minted {
                let enrollments = tokens
                    .into_iter()
                    .zip(&mut phones)
                    .map(|(token, (csr, device))| (token, csr, device))
                    .collect();
                work.push(Work::Enroll {
                    client: Caller::connect(settings, Credential::None).await?,
                    enrollments,
                });
            }
        }
        Scenario::Token => {
            for _ in 0..settings.concurrency {
                work.push(Work::Token {
                    client: Caller::connect(settings, Credential::role(&settings.certs, "service"))
                        .await?,
                });
            }
        }
        Scenario::Status | Scenario::Ocsp => {
            let issuer = crate::ca::pki::read_certificate_der(&settings.certs.join("issuing.pem"))?;
            let mut serials = Vec::new();
            let mut requests = Vec::new();
            // A status run over a population picks a device per request.
            let population = match (settings.scenario, settings.population) {
                (Scenario::Status, Some(size)) => Some(Arc::new(
                    population::Chooser::new(size, settings.skew)
                        .map_err(|e| Error::invalid("population", e))?,
                )),
                _ => None,
            };
            for i in 0..if population.is_some() { 0 } else { 16 } {
                let customer = format!("bench-{}-{i}", random_suffix());
                let (_, identity, der) =
                    enroll_device(settings, &service, &customer, &format!("{customer}-phone"))
                        .await?;
                serials.push(identity.serial);
                requests.push(bytes::Bytes::from(ocsp_request(&issuer, &der)?));
            }
            let serials = Arc::new(serials);
            let requests = Arc::new(requests);
            let address = require_loopback("HTTP address", &settings.http)?;
            for _ in 0..settings.concurrency {
                work.push(match settings.scenario {
                    Scenario::Status => Work::Status {
                        client: Caller::connect(
                            settings,
                            Credential::role(&settings.certs, "service"),
                        )
                        .await?,
                        serials: serials.clone(),
                        population: population.clone(),
                    },
                    _ => Work::Ocsp {
                        address,
                        requests: requests.clone(),
                    },
                });
            }
        }
    }
    Ok(work)
}

pub(super) fn random_suffix() -> String {
    crate::model::Serial::random().to_hex()[..8].to_string()
}
