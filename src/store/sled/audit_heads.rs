//! Signed heads of the two audit chains, so that tampering is detected and not only accidents.
//!
//! A hash chain shows that an entry was altered or removed only to someone who kept an earlier
//! hash: whoever can write the data directory can edit a record and recompute every hash after
//! it. So a running payra signs the heads of both chains with the issuing CA key (through the
//! `CaSigner`, so an HSM key works alike) every `audit.head_interval_s` and at shutdown, and
//! appends each signed head to `<data>/audit-heads.log`, one JSON line, synced. `payra audit
//! verify` checks every signed head against the chains; `payra audit head` prints the latest,
//! to be kept outside the machine (a ticket, a WORM store, a partner) and given back to
//! `audit verify --anchor` later.
//!
//! What it proves (docs/security.md): no entry at or before a signed head was altered,
//! removed or reordered since the head was signed, unless the CA key signed a forgery. Entries
//! after the latest signed head are covered by nothing yet; dropping the newest heads together
//! with the tail of the chains is caught only by a head kept outside.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::ChainHead;

/// The file, in the data directory.
pub const HEADS_FILE: &str = "audit-heads.log";
/// What a head's signature covers: this prefix, then the statement's JSON.
const SIGNED_PREFIX: &[u8] = b"payra.v1.AuditHead\n";

/// What a signed head states: both chains' heads at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadStatement {
    pub version: u32,
    pub signed_at_ms: i64,
    /// The change chain (sled `audit` tree): last entry number and hash (hex).
    pub change_seq: u64,
    pub change_hash: String,
    /// The decision chain (the decision log): last durable record number and hash (hex).
    pub decision_seq: u64,
    pub decision_hash: String,
}

/// A statement and the issuing CA's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHead {
    pub statement: HeadStatement,
    /// DER ECDSA P-256 / SHA-256 signature, base64.
    pub signature: String,
}

impl HeadStatement {
    /// A statement of `change` and `decision` at `signed_at_ms`.
    pub fn of(change: ChainHead, decision: ChainHead, signed_at_ms: i64) -> HeadStatement {
        HeadStatement {
            version: 1,
            signed_at_ms,
            change_seq: change.seq,
            change_hash: hex::encode(change.hash),
            decision_seq: decision.seq,
            decision_hash: hex::encode(decision.hash),
        }
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = SIGNED_PREFIX.to_vec();
        serde_json::to_writer(&mut bytes, self)
            .map_err(|e| Error::internal(format!("encoding an audit head: {e}")))?;
        Ok(bytes)
    }
}

impl SignedHead {
    /// Signs `statement` with `sign` (the CA signer's DER ECDSA over SHA-256).
    pub fn sign(
        statement: HeadStatement,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<SignedHead> {
        let signature = sign(&statement.signed_bytes()?)?;
        Ok(SignedHead {
            statement,
            signature: base64::engine::general_purpose::STANDARD.encode(signature),
        })
    }

    /// Whether the signature verifies under `public_key_sec1` (the issuing CA's key).
    pub fn signature_verifies(&self, public_key_sec1: &[u8]) -> bool {
        let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(&self.signature)
        else {
            return false;
        };
        let Ok(message) = self.statement.signed_bytes() else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            public_key_sec1,
        )
        .verify(&message, &signature)
        .is_ok()
    }

    /// Reads a head from one line of JSON (as `payra audit head` prints it).
    pub fn parse(line: &str) -> Result<SignedHead> {
        serde_json::from_str(line.trim())
            .map_err(|e| Error::invalid("audit head", format!("not a signed head: {e}")))
    }

    /// The head as one line of JSON.
    pub fn to_line(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::internal(format!("encoding an audit head: {e}")))
    }
}

fn heads_path(data_dir: &Path) -> PathBuf {
    data_dir.join(HEADS_FILE)
}

/// Appends `head` to the data directory's head file and syncs it (and the directory, when the
/// file is new).
pub fn append(data_dir: &Path, head: &SignedHead) -> Result<()> {
    let path = heads_path(data_dir);
    let created = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut line = head.to_line()?;
    line.push('\n');
    file.write_all(line.as_bytes())?;
    file.sync_data()?;
    if created {
        std::fs::File::open(data_dir)?.sync_all()?;
    }
    Ok(())
}

/// Every head in the data directory's head file, in the order signed. A last line without
/// its line break (a crash while appending, never relied on) is ignored; any other line that
/// does not parse is an error.
pub fn read_all(data_dir: &Path) -> Result<Vec<SignedHead>> {
    let text = match std::fs::read_to_string(heads_path(data_dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            SignedHead::parse(line)
                .map_err(|e| Error::FailedPrecondition(format!("{HEADS_FILE} line {}: {e}", n + 1)))
        })
        .collect()
}

/// Checks `head` against the chains: its signature under `public_key_sec1`, and that each
/// chain, which ends at `change_end` / `decision_end`, still has the stated hash at the
/// stated number (`change_hash_at` / `decision_hash_at` give a chain's hash at a number).
/// `None` when it holds, else why not.
pub fn check_head(
    head: &SignedHead,
    public_key_sec1: &[u8],
    change_end: u64,
    decision_end: u64,
    change_hash_at: &dyn Fn(u64) -> Option<[u8; 32]>,
    decision_hash_at: &dyn Fn(u64) -> Option<[u8; 32]>,
) -> Option<String> {
    let statement = &head.statement;
    if !head.signature_verifies(public_key_sec1) {
        return Some("its signature does not verify under the issuing CA's key".into());
    }
    for (chain, seq, hash, end, hash_at) in [
        (
            "change",
            statement.change_seq,
            &statement.change_hash,
            change_end,
            change_hash_at,
        ),
        (
            "decision",
            statement.decision_seq,
            &statement.decision_hash,
            decision_end,
            decision_hash_at,
        ),
    ] {
        if seq > end {
            return Some(format!(
                "it covers {chain} entry {seq}, but the {chain} chain ends at {end}: entries were \
                 removed"
            ));
        }
        let found = if seq == 0 {
            Some(crate::store::audit::GENESIS_HASH)
        } else {
            hash_at(seq)
        };
        if found.map(hex::encode).as_ref() != Some(hash) {
            return Some(format!(
                "the {chain} chain's hash at entry {seq} is not the signed one: an entry at or \
                 before {seq} was altered"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaSigner, KeyFileSigner};

    fn signer() -> KeyFileSigner {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        KeyFileSigner::from_key_pair(key).unwrap()
    }

    fn head(seq: u64, byte: u8) -> ChainHead {
        ChainHead {
            seq,
            hash: [byte; 32],
        }
    }

    #[test]
    fn a_signed_head_verifies_and_any_change_breaks_it() {
        let signer = signer();
        let signed = SignedHead::sign(HeadStatement::of(head(3, 1), head(7, 2), 1_000), |m| {
            signer.sign(m)
        })
        .unwrap();
        let key = signer.public_key_sec1();
        assert!(signed.signature_verifies(key));
        let parsed = SignedHead::parse(&signed.to_line().unwrap()).unwrap();
        assert_eq!(parsed, signed);
        let mut moved = signed.clone();
        moved.statement.decision_seq = 6;
        assert!(!moved.signature_verifies(key));
        let other = self::signer();
        assert!(!signed.signature_verifies(other.public_key_sec1()));
    }

    #[test]
    fn heads_are_checked_against_the_chains() {
        let signer = signer();
        let signed = SignedHead::sign(HeadStatement::of(head(3, 1), head(7, 2), 1_000), |m| {
            signer.sign(m)
        })
        .unwrap();
        let key = signer.public_key_sec1();
        let change = |seq: u64| (seq == 3).then_some([1u8; 32]);
        let decision = |seq: u64| (seq == 7).then_some([2u8; 32]);
        assert_eq!(check_head(&signed, key, 3, 9, &change, &decision), None);
        let cut = check_head(&signed, key, 3, 6, &change, &decision).unwrap();
        assert!(cut.contains("removed"), "{cut}");
        let altered = |seq: u64| (seq == 7).then_some([9u8; 32]);
        let why = check_head(&signed, key, 3, 9, &change, &altered).unwrap();
        assert!(why.contains("altered"), "{why}");
    }

    #[test]
    fn the_head_file_appends_and_ignores_only_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_all(dir.path()).unwrap().is_empty());
        let signer = signer();
        let first = SignedHead::sign(HeadStatement::of(head(1, 1), head(1, 1), 1), |m| {
            signer.sign(m)
        })
        .unwrap();
        append(dir.path(), &first).unwrap();
        append(dir.path(), &first).unwrap();
        let path = dir.path().join(HEADS_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"statement\":");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_all(dir.path()).unwrap().len(), 2);
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        assert!(read_all(dir.path()).is_err());
    }
}
