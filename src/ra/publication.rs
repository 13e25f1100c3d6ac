//! Publishing revocation status to relying parties: the CRL and the OCSP responder, with
//! caches that a revocation invalidates before it is acknowledged.
//!
//! Every change of revocation state bumps a generation counter after it is durable and
//! before the RPC answers. A cached CRL or OCSP response remembers the generation it was
//! built at and is rebuilt when the counter has moved, so nothing published lags an
//! acknowledged revocation.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::Ra;
use crate::ca::{build_crl, CrlEntry, OcspResponder, OcspStatus};
use crate::error::{Error, Result};
use crate::model::KeyAlgorithm;

/// Most cached OCSP responses; the cache is emptied when it grows past this.
const OCSP_CACHE_LIMIT: usize = 100_000;

/// A signed CRL and what it was built from.
#[derive(Debug, Clone)]
pub struct PublishedCrl {
    pub der: Vec<u8>,
    pub number: u64,
    pub this_update_s: i64,
    pub next_update_s: i64,
    generation: u64,
}

#[derive(Debug, Clone)]
struct CachedOcsp {
    der: Vec<u8>,
    this_update_s: i64,
    generation: u64,
}

/// A signed OCSP answer, with what HTTP caches need to know of it.
#[derive(Debug, Clone)]
pub struct OcspAnswer {
    pub der: Vec<u8>,
    /// For a successful answer to a request without a nonce: how long an HTTP cache may keep
    /// it. `None`: no cache may.
    pub freshness: Option<OcspFreshness>,
}

/// When an OCSP answer was signed and how long it may be served from a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OcspFreshness {
    /// thisUpdate (= producedAt), Unix seconds.
    pub this_update_s: i64,
    /// nextUpdate, Unix seconds.
    pub next_update_s: i64,
    /// Seconds until payra itself would sign a fresh answer (half the validity, never past
    /// nextUpdate): a cache that keeps it this long serves nothing staler than payra does.
    pub max_age_s: i64,
}

impl OcspAnswer {
    fn uncacheable(der: Vec<u8>) -> OcspAnswer {
        OcspAnswer {
            der,
            freshness: None,
        }
    }
}

/// CRL and OCSP state of a running RA.
pub struct Publication {
    responder: OcspResponder,
    /// The SM2 issuing CA's responder, when there is an SM2 hierarchy.
    sm2_responder: Option<OcspResponder>,
    generation: AtomicU64,
    crl: Mutex<Option<PublishedCrl>>,
    sm2_crl: Mutex<Option<PublishedCrl>>,
    /// Keyed by the request's DER CertID: the response must echo the CertID exactly as asked
    /// (SHA-1 and SHA-256 requests for one serial get different responses).
    ocsp_cache: RwLock<HashMap<Vec<u8>, CachedOcsp>>,
    crl_wakeup: tokio::sync::Notify,
    crl_validity_s: i64,
    ocsp_validity_s: i64,
}

impl Publication {
    pub fn new(
        responder: OcspResponder,
        sm2_responder: Option<OcspResponder>,
        crl_validity_s: i64,
        ocsp_validity_s: i64,
    ) -> Self {
        Publication {
            responder,
            sm2_responder,
            generation: AtomicU64::new(0),
            crl: Mutex::new(None),
            sm2_crl: Mutex::new(None),
            ocsp_cache: RwLock::new(HashMap::new()),
            crl_wakeup: tokio::sync::Notify::new(),
            crl_validity_s,
            ocsp_validity_s,
        }
    }

    /// Records that revocation state changed (call after the change is durable).
    pub fn revocation_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.crl_wakeup.notify_one();
    }

    /// Woken on every revocation change; the CRL task waits on it.
    pub fn crl_wakeup(&self) -> &tokio::sync::Notify {
        &self.crl_wakeup
    }

    /// The P-256 CA's CRL served last, if any.
    pub fn last_crl(&self) -> Option<PublishedCrl> {
        self.crl.lock().unpoisoned().clone()
    }

    /// The SM2 CA's CRL served last, if any.
    pub fn last_sm2_crl(&self) -> Option<PublishedCrl> {
        self.sm2_crl.lock().unpoisoned().clone()
    }

    /// Whether there is an SM2 CA (and so an SM2 CRL) to publish.
    pub fn has_sm2(&self) -> bool {
        self.sm2_responder.is_some()
    }

    /// Seconds between CRL rebuilds when nothing changes.
    pub fn crl_refresh_s(&self) -> i64 {
        self.crl_validity_s / 2
    }
}

impl Ra {
    /// The P-256 CA's current CRL; see [`Ra::current_crl_of`].
    pub fn current_crl(&self) -> Result<PublishedCrl> {
        self.current_crl_of(KeyAlgorithm::P256)
    }

    /// The current CRL of the `algorithm` hierarchy's issuing CA, rebuilt first if a
    /// revocation changed since the last one or half its validity has passed. Concurrent
    /// callers share one rebuild. Each CA's CRL lists the certificates it issued; both take
    /// their numbers from one increasing sequence.
    pub fn current_crl_of(&self, algorithm: KeyAlgorithm) -> Result<PublishedCrl> {
        let publication = &self.publication;
        let sm2 = match algorithm {
            KeyAlgorithm::P256 => None,
            KeyAlgorithm::Sm2 => Some(self.ca.sm2.as_ref().ok_or_else(|| {
                Error::NotFound("this payra has no SM2 issuing CA, so no SM2 CRL".into())
            })?),
        };
        let mut slot = match algorithm {
            KeyAlgorithm::P256 => publication.crl.lock().unpoisoned(),
            KeyAlgorithm::Sm2 => publication.sm2_crl.lock().unpoisoned(),
        };
        let now_s = self.clock.now_s();
        let generation = publication.generation.load(Ordering::SeqCst);
        if let Some(crl) = slot.as_ref() {
            let fresh = now_s < crl.this_update_s + publication.crl_refresh_s();
            if crl.generation == generation && fresh {
                return Ok(crl.clone());
            }
        }
        let last_this_update_s = slot.as_ref().map(|crl| crl.this_update_s);
        let validity_s = publication.crl_validity_s;
        let entries: Vec<CrlEntry> = self
            .store
            .revoked_entries()?
            .into_iter()
            // An upstream CA's certificates are on its own CRL, not payra's.
            .filter(|entry| entry.key_algorithm == algorithm && !entry.issued_upstream)
            .filter(|entry| stays_on_crl(entry.not_after_s, now_s, validity_s, last_this_update_s))
            .map(|entry| CrlEntry {
                serial: entry.serial,
                revoked_at_s: entry.revocation.revoked_at_s,
                reason: entry.revocation.reason,
            })
            .collect();
        // At least the current time in milliseconds: numbers stay increasing even after a
        // restore brings back an older counter (CRLs are signed far less than once per ms).
        let number = self
            .store
            .next_crl_number(u64::try_from(self.clock.now_ms()).unwrap_or(0))?;
        let next_update_s = now_s + publication.crl_validity_s;
        let der = match sm2 {
            None => build_crl(
                &self.ca.issuer,
                &self.ca.issuing_key_id,
                number,
                now_s,
                next_update_s,
                &entries,
            )?,
            Some(sm2) => sm2
                .issuer
                .sign_crl(number, now_s, next_update_s, &entries)?,
        };
        tracing::info!(
            number,
            entries = entries.len(),
            ca = algorithm.name(),
            "CRL signed"
        );
        let crl = PublishedCrl {
            der,
            number,
            this_update_s: now_s,
            next_update_s,
            generation,
        };
        *slot = Some(crl.clone());
        Ok(crl)
    }

    /// Answers a DER OCSP request with a DER OCSP response; never fails (a malformed request
    /// gets `malformedRequest`, an internal fault `internalError`).
    pub fn ocsp_response(&self, request_der: &[u8]) -> OcspAnswer {
        let publication = &self.publication;
        let Some(mut request) = publication.responder.parse_request(request_der) else {
            return OcspAnswer::uncacheable(OcspResponder::malformed());
        };
        // The request names one of the two issuing CAs; a request that names neither is
        // answered `unknown` by the P-256 CA.
        let mut responder = (&publication.responder, KeyAlgorithm::P256);
        if let Some(sm2) = &publication.sm2_responder {
            if request.items.iter().all(|(_, serial)| serial.is_none()) {
                if let Some(parsed) = sm2.parse_request(request_der) {
                    if parsed.items.iter().any(|(_, serial)| serial.is_some()) {
                        request = parsed;
                        responder = (sm2, KeyAlgorithm::Sm2);
                    }
                }
            }
        }
        let (responder, issuer_algorithm) = responder;
        let now_s = self.clock.now_s();
        let freshness = |this_update_s: i64| OcspFreshness {
            this_update_s,
            next_update_s: this_update_s + publication.ocsp_validity_s,
            max_age_s: (this_update_s + publication.ocsp_validity_s / 2 - now_s).max(0),
        };
        let generation = publication.generation.load(Ordering::SeqCst);
        let cacheable = request.nonce.is_none() && request.items.len() == 1;
        let cache_key = request
            .items
            .first()
            .filter(|(_, serial)| serial.is_some())
            .and_then(|(cert_id, _)| der::Encode::to_der(cert_id).ok());
        if cacheable {
            if let Some(key) = &cache_key {
                let cache = publication.ocsp_cache.read().unpoisoned();
                if let Some(hit) = cache.get(key) {
                    if hit.generation == generation
                        && now_s < hit.this_update_s + publication.ocsp_validity_s / 2
                    {
                        self.metrics
                            .ocsp_responses
                            .with_label_values(&["cache"])
                            .inc();
                        return OcspAnswer {
                            der: hit.der.clone(),
                            freshness: Some(freshness(hit.this_update_s)),
                        };
                    }
                }
            }
        }
        let mut statuses = Vec::with_capacity(request.items.len());
        for (_, serial) in &request.items {
            let status = match serial {
                None => OcspStatus::Unknown,
                Some(serial) => match self.store.certificate(serial) {
                    // A serial of the other CA's, or of the upstream CA's (RA mode): not
                    // this issuer's certificate.
                    Ok(Some(record))
                        if record.key_algorithm != issuer_algorithm || record.issued_upstream =>
                    {
                        OcspStatus::Unknown
                    }
                    Ok(Some(record)) => match record.revocation {
                        Some(r) => OcspStatus::Revoked {
                            revoked_at_s: r.revoked_at_s,
                            reason: r.reason,
                        },
                        None => OcspStatus::Good,
                    },
                    Ok(None) if issuer_algorithm != KeyAlgorithm::P256 => OcspStatus::Unknown,
                    Ok(None) => match self.store.client_certificate(serial) {
                        Ok(Some(client)) => match client.revocation {
                            Some(r) => OcspStatus::Revoked {
                                revoked_at_s: r.revoked_at_s,
                                reason: r.reason,
                            },
                            None => OcspStatus::Good,
                        },
                        _ => OcspStatus::Unknown,
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "OCSP status lookup failed");
                        self.metrics
                            .ocsp_responses
                            .with_label_values(&["error"])
                            .inc();
                        return OcspAnswer::uncacheable(x509_ocsp_internal_error());
                    }
                },
            };
            statuses.push(status);
        }
        let der = match responder.respond(&request, &statuses, now_s, publication.ocsp_validity_s) {
            Ok(der) => der,
            Err(e) => {
                tracing::error!(error = %e, "OCSP signing failed");
                self.metrics
                    .ocsp_responses
                    .with_label_values(&["error"])
                    .inc();
                // A signer out of reach (an HSM) will be back: the client should try later.
                return OcspAnswer::uncacheable(match e.kind() {
                    crate::error::ErrorKind::Unavailable => x509_ocsp_try_later(),
                    _ => x509_ocsp_internal_error(),
                });
            }
        };
        self.metrics
            .ocsp_responses
            .with_label_values(&["signed"])
            .inc();
        // Unknown answers are not cached: the serial may be issued a moment later.
        if let (true, Some(key), Some(status)) = (cacheable, cache_key, statuses.first()) {
            if *status != OcspStatus::Unknown {
                let mut cache = publication.ocsp_cache.write().unpoisoned();
                if cache.len() >= OCSP_CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(
                    key,
                    CachedOcsp {
                        der: der.clone(),
                        this_update_s: now_s,
                        generation,
                    },
                );
            }
        }
        // An `unknown` answer is not for HTTP caches either: the serial may be issued a
        // moment later.
        let cacheable = request.nonce.is_none() && !statuses.contains(&OcspStatus::Unknown);
        OcspAnswer {
            der,
            freshness: cacheable.then(|| freshness(now_s)),
        }
    }
}

/// Whether a revoked certificate that expires at `not_after_s` goes on a CRL signed at
/// `now_s`. RFC 5280 §3.3: an entry may leave the CRL only after it has appeared on one
/// regularly scheduled CRL issued after the certificate's notAfter (a key-compromise entry
/// that vanished at notAfter would leave a disputed payment signed just before it without an
/// answer). It stays for a whole CRL validity past notAfter, in which a running payra signs at
/// least two scheduled CRLs (one every half validity), and for as long as the last CRL this
/// process signed (`last_this_update_s`) predates notAfter. Before this process has signed
/// one (`None`, just after a start), it stays: the first CRL after a start may be longer, but
/// a payra that was down past an entry's window still lists it once after its notAfter.
pub(crate) fn stays_on_crl(
    not_after_s: i64,
    now_s: i64,
    crl_validity_s: i64,
    last_this_update_s: Option<i64>,
) -> bool {
    now_s < not_after_s.saturating_add(crl_validity_s)
        || last_this_update_s.is_none_or(|last| last < not_after_s)
}

fn x509_ocsp_try_later() -> Vec<u8> {
    use der::Encode;
    x509_ocsp::OcspResponse::try_later()
        .to_der()
        .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x03])
}

fn x509_ocsp_internal_error() -> Vec<u8> {
    use der::Encode;
    x509_ocsp::OcspResponse::internal_error()
        .to_der()
        .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x02])
}

#[cfg(test)]
mod tests {
    use super::stays_on_crl;

    #[test]
    fn an_expired_entry_stays_until_a_crl_after_its_not_after() {
        let not_after = 1_000_000;
        let day = 86_400;
        // Live, and just expired: listed.
        assert!(stays_on_crl(not_after, not_after - 1, day, None));
        assert!(stays_on_crl(
            not_after,
            not_after,
            day,
            Some(not_after - 10)
        ));
        assert!(stays_on_crl(
            not_after,
            not_after + day - 1,
            day,
            Some(not_after + 100)
        ));
        // A whole validity past notAfter, with a CRL signed after notAfter: gone.
        assert!(!stays_on_crl(
            not_after,
            not_after + day,
            day,
            Some(not_after + day / 2)
        ));
        // Nothing signed since this process started: listed once more.
        assert!(stays_on_crl(not_after, not_after + 5 * day, day, None));
        // No CRL since before notAfter (the CRL task could not run): still listed.
        assert!(stays_on_crl(
            not_after,
            not_after + 5 * day,
            day,
            Some(not_after - 1)
        ));
    }
}
