//! Client certificates of payment services and operators: issuing them, registering the ones
//! `payra init` wrote, and the in-memory set of revoked ones that the authorization layer
//! checks on every call, so a revoked credential is locked out at once.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Issued, Ra};
use crate::ca::{issue_client_certificate, parse_device_csr};
use crate::error::{Error, Result};
use crate::model::{CustomerId, RevocationReason, Serial};
use crate::store::{
    Actor, AuditEvent, ClientCertificateRecord, Revocation, RevokeRejection, Store, RECORD_VERSION,
};

/// The roles a client certificate may carry.
pub const CLIENT_ROLES: [&str; 2] = ["service", "operator"];

/// Where a service or operator certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStanding {
    /// Not issued through payra nor registered at start: refused.
    Unknown,
    Active,
    Revoked,
}

/// Every registered client certificate and whether it is revoked, shared with the
/// authorization layer: only registered, unrevoked service and operator certificates get in,
/// so every credential that works can also be revoked.
#[derive(Default)]
pub struct ClientRegistry {
    serials: RwLock<HashMap<Serial, bool>>,
}

impl ClientRegistry {
    /// Loads the registered client certificates from `store`.
    pub fn load(store: &dyn Store) -> Result<ClientRegistry> {
        let serials = store
            .client_certificates()?
            .into_iter()
            .map(|record| (record.serial, record.revocation.is_some()))
            .collect();
        Ok(ClientRegistry {
            serials: RwLock::new(serials),
        })
    }

    /// The standing of `serial`.
    pub fn standing(&self, serial: &Serial) -> ClientStanding {
        match self.serials.read().unpoisoned().get(serial) {
            None => ClientStanding::Unknown,
            Some(false) => ClientStanding::Active,
            Some(true) => ClientStanding::Revoked,
        }
    }

    /// Takes `record`'s standing as the store holds it (changed by another payra process).
    pub(crate) fn refresh(&self, record: &ClientCertificateRecord) {
        self.set(record.serial.clone(), record.revocation.is_some());
    }

    fn set(&self, serial: Serial, revoked: bool) {
        self.serials.write().unpoisoned().insert(serial, revoked);
    }
}

fn record_of(der: &[u8], role: &str, issued_at_s: i64) -> Result<ClientCertificateRecord> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::internal(format!("client certificate does not parse: {e}")))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or(role)
        .to_string();
    Ok(ClientCertificateRecord {
        version: RECORD_VERSION,
        serial: Serial::from_bytes("serial", cert.raw_serial())?,
        role: role.to_string(),
        name,
        not_before_s: cert.validity().not_before.timestamp(),
        not_after_s: cert.validity().not_after.timestamp(),
        issued_at_s,
        certificate_b64: crate::store::CertificateRecord::encode_der(der),
        revocation: None,
    })
}

impl Ra {
    /// Records the `operator.pem` and `service.pem` found in `certs_dir` (written by
    /// `payra init`), so they can be listed and revoked like issued ones.
    pub fn register_bootstrap_clients(&self, certs_dir: &Path) -> Result<()> {
        for role in CLIENT_ROLES {
            let path = certs_dir.join(format!("{role}.pem"));
            if !path.exists() {
                continue;
            }
            let der = crate::ca::pki::read_certificate_der(&path)?;
            let record = record_of(&der, role, self.clock.now_s())?;
            if let Some(known) = self.store.client_certificate(&record.serial)? {
                self.clients.set(known.serial, known.revocation.is_some());
                continue;
            }
            let audit = AuditEvent::new(
                self.clock.now_ms(),
                &Actor::system(),
                "client.registered",
                record.serial.to_hex(),
                format!("{role} {}", record.name),
            );
            self.store.put_client_certificate(&record, &audit)?;
            self.clients.set(record.serial, false);
        }
        Ok(())
    }

    /// Issues a client certificate of `role` (`service` or `operator`) named `name` for the
    /// key in `csr_der`.
    pub fn issue_client_certificate(
        &self,
        actor: &Actor,
        role: &str,
        name: &str,
        csr_der: &[u8],
    ) -> Result<Issued> {
        if !CLIENT_ROLES.contains(&role) {
            return Err(Error::invalid("role", "must be service or operator"));
        }
        // Names follow the customer-id alphabet: they appear in subjects and logs.
        CustomerId::parse("name", name)?;
        let key = parse_device_csr(csr_der)?;
        if key.algorithm() != crate::model::KeyAlgorithm::P256 {
            return Err(Error::invalid(
                "csr_der",
                format!(
                    "key type {} is not accepted for a client certificate; payra's TLS speaks \
                     EC P-256 only",
                    key.algorithm()
                ),
            ));
        }
        let now_s = self.clock.now_s();
        let serial = Serial::random();
        let certificate = issue_client_certificate(
            &self.ca.issuer,
            &self.policy.profile,
            &key,
            &serial,
            role,
            name,
            now_s,
            self.policy.profile.validity_s,
        )?;
        let record = record_of(&certificate.der, role, now_s)?;
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "client.issued",
            serial.to_hex(),
            format!("{role} {name}"),
        );
        if !self.store.put_client_certificate(&record, &audit)? {
            return Err(Error::internal("random serial collided"));
        }
        self.clients.set(serial.clone(), false);
        self.metrics
            .certificates_issued
            .with_label_values(&["client"])
            .inc();
        tracing::info!(serial = %serial, role, name, "client certificate issued");
        Ok(Issued {
            record: crate::store::CertificateRecord {
                version: RECORD_VERSION,
                serial,
                customer_id: CustomerId::parse("name", name)?,
                device_id: crate::model::DeviceId::parse("role", role)?,
                device_info: Default::default(),
                subject: certificate.subject,
                not_before_s: certificate.not_before_s,
                not_after_s: certificate.not_after_s,
                issued_at_s: now_s,
                public_key_hex: hex::encode(key.sec1()),
                key_algorithm: Default::default(),
                certificate_b64: record.certificate_b64,
                revocation: None,
                renewed_from: None,
                superseded_by: None,
                subscriber_ref: None,
                attestation: None,
                issued_upstream: false,
            },
            certificate_der: certificate.der,
            chain_der: vec![self.ca.issuing_der.clone()],
        })
    }

    /// Revokes a client certificate; from the next call on, it is refused.
    pub(super) fn revoke_client(
        &self,
        actor: &Actor,
        serial: &Serial,
        reason: RevocationReason,
    ) -> Result<Revocation> {
        let revocation = Revocation {
            revoked_at_s: self.clock.now_s(),
            reason,
        };
        let audit = AuditEvent::new(
            self.clock.now_ms(),
            actor,
            "client.revoked",
            serial.to_hex(),
            reason.cli_name(),
        );
        match self
            .store
            .revoke_client_certificate(serial, &revocation, &audit)?
        {
            Ok(()) => {}
            Err(RevokeRejection::AlreadyRevoked(serial, existing)) => {
                return Err(Error::FailedPrecondition(format!(
                    "certificate {serial} was already revoked at {} with reason {}",
                    crate::model::moment(existing.revoked_at_s),
                    existing.reason.cli_name()
                )))
            }
            Err(_) => {
                return Err(Error::NotFound(format!(
                    "no certificate with serial {serial}"
                )))
            }
        }
        self.clients.set(serial.clone(), true);
        self.metrics
            .certificates_revoked
            .with_label_values(&[reason.cli_name()])
            .inc();
        self.publication.revocation_changed();
        tracing::info!(serial = %serial, reason = reason.cli_name(), "client certificate revoked");
        Ok(revocation)
    }

    /// The registered client certificates, for the authorization layer.
    pub fn clients(&self) -> &ClientRegistry {
        &self.clients
    }
}
