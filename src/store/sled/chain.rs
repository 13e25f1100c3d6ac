//! The change chain in sled: the head kept in `meta`, each entry linked to it in the same
//! transaction as the change; and the summary and revoked-index rows written beside a record.

use super::*;

/// The audit chain's head: the last entry's number and hash.
pub(super) struct AuditHead {
    pub(super) seq: u64,
    pub(super) hash: Vec<u8>,
}

impl AuditHead {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut head = self.seq.to_be_bytes().to_vec();
        head.extend_from_slice(&self.hash);
        head
    }
}

pub(super) fn audit_head(stored: Option<&[u8]>) -> AuditHead {
    match stored {
        Some(head) if head.len() == 40 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&head[..8]);
            AuditHead {
                seq: u64::from_be_bytes(seq),
                hash: head[8..].to_vec(),
            }
        }
        _ => AuditHead {
            seq: 0,
            hash: GENESIS_HASH.to_vec(),
        },
    }
}

/// The entry that appends `event` after `head`: its key, its encoding, and the new head.
pub(super) fn audit_entry(
    head: &AuditHead,
    event: &AuditEvent,
) -> Result<(Vec<u8>, Vec<u8>, AuditHead)> {
    let body = AuditBody {
        version: 1,
        seq: head.seq + 1,
        prev_hash: hex::encode(&head.hash),
        event: event.clone(),
    };
    let hash = chain_hash(&head.hash, &body);
    let entry = AuditEntry {
        body,
        hash: hex::encode(hash),
    };
    Ok((
        (head.seq + 1).to_be_bytes().to_vec(),
        encode(&entry)?,
        AuditHead {
            seq: head.seq + 1,
            hash: hash.to_vec(),
        },
    ))
}

/// Appends `event` to the audit chain inside a transaction: reads the head, links the new
/// entry to it and moves the head. Transactions touching the head are serialized by sled.
pub(super) fn append_audit(
    audit: &TransactionalTree,
    meta: &TransactionalTree,
    event: &AuditEvent,
) -> std::result::Result<(), ConflictableTransactionError<Error>> {
    let head = audit_head(meta.get(AUDIT_HEAD_KEY)?.as_deref());
    let (key, entry, head) = audit_entry(&head, event).map_err(abort)?;
    audit.insert(key, entry)?;
    meta.insert(AUDIT_HEAD_KEY, head.encode())?;
    Ok(())
}

pub(super) fn read_i64(bytes: Option<sled::IVec>) -> i64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, i64::from_be_bytes)
}

/// Writes the verifier's summary of `record` inside a transaction.
pub(super) fn put_summary(
    summaries: &TransactionalTree,
    record: &CertificateRecord,
) -> std::result::Result<(), ConflictableTransactionError<Error>> {
    let summary = CertificateSummary::of(record).map_err(abort)?;
    summaries.insert(record.serial.as_bytes(), summary.encode())?;
    Ok(())
}

pub(super) fn put_revoked(
    revoked: &TransactionalTree,
    record: &CertificateRecord,
) -> std::result::Result<(), Error> {
    let Some(revocation) = record.revocation else {
        return Ok(());
    };
    let entry = RevokedEntry {
        serial: record.serial.clone(),
        revocation,
        not_after_s: record.not_after_s,
        key_algorithm: record.key_algorithm,
        issued_upstream: record.issued_upstream,
    };
    revoked
        .insert(record.serial.as_bytes(), encode(&entry)?)
        .map_err(|e| Error::internal(format!("storage: {e:?}")))?;
    Ok(())
}
