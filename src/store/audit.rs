//! The audit log: every state change and every verification decision, appended in the same
//! transaction as the change it records, each entry chained to the one before by SHA-256.
//!
//! `hash(n) = SHA-256(hash(n-1) || JSON(body(n)))`, with `hash(0)` = 32 zero bytes and the
//! body's JSON in field order. Changing, removing or reordering any entry breaks every hash
//! after it; `payra audit verify` recomputes the chain and names the first broken entry.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Who did it: the SHA-256 fingerprint of the client certificate (hex) and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub role: String,
    /// Empty for anonymous callers and for payra itself.
    pub fingerprint: String,
}

impl Actor {
    /// payra acting on its own (background work, start-up).
    pub fn system() -> Actor {
        Actor {
            role: "system".into(),
            fingerprint: String::new(),
        }
    }

    /// A caller identified by its certificate.
    pub fn with_certificate(role: &str, certificate_der: &[u8]) -> Actor {
        Actor {
            role: role.into(),
            fingerprint: hex::encode(Sha256::digest(certificate_der)),
        }
    }

    /// A caller without a certificate.
    pub fn anonymous() -> Actor {
        Actor {
            role: "anonymous".into(),
            fingerprint: String::new(),
        }
    }
}

/// What happened, before it is placed in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub at_ms: i64,
    pub actor: Actor,
    /// `token.created`, `certificate.issued`, `certificate.revoked`, `payment.verified`, ...
    pub action: String,
    /// What it was done to: a serial, a customer, an evidence id.
    pub target: String,
    /// `ok`, or the verdict of a verification.
    pub outcome: String,
}

impl AuditEvent {
    pub fn new(
        at_ms: i64,
        actor: &Actor,
        action: &str,
        target: impl Into<String>,
        outcome: impl Into<String>,
    ) -> AuditEvent {
        AuditEvent {
            at_ms,
            actor: actor.clone(),
            action: action.into(),
            target: target.into(),
            outcome: outcome.into(),
        }
    }
}

/// The hashed part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBody {
    pub version: u32,
    pub seq: u64,
    pub prev_hash: String,
    pub event: AuditEvent,
}

/// A stored entry: the body and its chain hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub body: AuditBody,
    pub hash: String,
}

/// The hash before the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// `SHA-256(prev_hash || JSON(body))`.
pub fn chain_hash(prev_hash: &[u8], body: &AuditBody) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    // Serializing a plain struct of strings and integers cannot fail.
    hasher.update(serde_json::to_vec(body).unwrap_or_default());
    hasher.finalize().into()
}

/// Where a hash chain stands: its last entry's number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The head of an empty chain.
    pub const GENESIS: ChainHead = ChainHead {
        seq: 0,
        hash: GENESIS_HASH,
    };
}

/// The outcome of checking a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    /// Every entry links; `entries` were checked.
    Intact { entries: u64 },
    /// The first entry that does not link, and why.
    Broken { seq: u64, reason: String },
}

/// Checks entries in order (as stored, by sequence number).
pub fn verify_chain(entries: impl IntoIterator<Item = AuditEntry>) -> AuditCheck {
    let mut prev = GENESIS_HASH.to_vec();
    let mut expected_seq = 1;
    for entry in entries {
        let seq = entry.body.seq;
        if seq != expected_seq {
            return AuditCheck::Broken {
                seq,
                reason: format!("expected entry {expected_seq}, found {seq} (entries missing)"),
            };
        }
        if entry.body.prev_hash != hex::encode(&prev) {
            return AuditCheck::Broken {
                seq,
                reason: "prev_hash does not match the previous entry's hash".into(),
            };
        }
        let hash = chain_hash(&prev, &entry.body);
        if entry.hash != hex::encode(hash) {
            return AuditCheck::Broken {
                seq,
                reason: "hash does not match the entry's content (entry altered)".into(),
            };
        }
        prev = hash.to_vec();
        expected_seq += 1;
    }
    AuditCheck::Intact {
        entries: expected_seq - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let body = AuditBody {
                    version: 1,
                    seq,
                    prev_hash: hex::encode(&prev),
                    event: AuditEvent::new(seq as i64, &Actor::system(), "test", "t", "ok"),
                };
                let hash = chain_hash(&prev, &body);
                prev = hash.to_vec();
                AuditEntry {
                    body,
                    hash: hex::encode(hash),
                }
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(chain(5)), AuditCheck::Intact { entries: 5 });
        assert_eq!(verify_chain(Vec::new()), AuditCheck::Intact { entries: 0 });
    }

    #[test]
    fn altered_removed_or_reordered_entries_are_found() {
        let mut altered = chain(5);
        altered[2].body.event.outcome = "forged".into();
        assert!(matches!(
            verify_chain(altered),
            AuditCheck::Broken { seq: 3, .. }
        ));

        let mut removed = chain(5);
        removed.remove(1);
        assert!(matches!(
            verify_chain(removed),
            AuditCheck::Broken { seq: 3, .. }
        ));

        let mut swapped = chain(5);
        swapped.swap(3, 4);
        assert!(matches!(
            verify_chain(swapped),
            AuditCheck::Broken { seq: 5, .. }
        ));
    }
}
