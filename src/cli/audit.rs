//! `payra audit`: the chains checked offline (sled data directory) or in PostgreSQL.

use std::path::Path;

use super::args::*;
use crate::CliResult;

/// Opens the database for the audit commands, which change nothing themselves. Opening
/// completes recovery as a start of the server would (it applies issuance-journal batches the
/// database lacks after a crash). sled allows one process at a time, so the server must be
/// stopped.
/// `payra audit verify`: both chains intact; the change chain ends at its recorded head; the
/// decision log reaches the ledger checkpoint; every signed head (and the anchor, if given)
/// verifies and still matches the chains.
pub(crate) fn audit_verify(
    data: &Path,
    certs: &Path,
    anchor: Option<&Path>,
    allow_unsigned: bool,
) -> CliResult {
    use payra::store::audit_heads::{check_head, read_all, SignedHead};
    use payra::store::decision_log::ChainCheck;
    use payra::store::{verify_audit_log, AuditCheck, DecisionLog, Store};
    // A copy: verifying must not write to the evidence it checks.
    let store = payra::store::read_only::open_copy(data).map_err(|e| e.to_string())?;
    let entries = match verify_audit_log(&*store).map_err(|e| e.to_string())? {
        AuditCheck::Intact { entries } => entries,
        AuditCheck::Broken { seq, reason } => {
            return Err(format!("audit log broken at entry {seq}: {reason}"))
        }
    };
    let recorded = store.audit_head().map_err(|e| e.to_string())?;
    let change_hash_at = |seq: u64| -> Option<[u8; 32]> {
        let entry = store.audit_entries(seq.checked_sub(1)?, 1).ok()?.pop()?;
        (entry.body.seq == seq).then_some(())?;
        hex::decode(&entry.hash).ok()?.try_into().ok()
    };
    if recorded.seq != entries || (entries > 0 && change_hash_at(entries) != Some(recorded.hash)) {
        return Err(format!(
            "audit log broken: the recorded head is entry {}, but the chain ends at entry \
             {entries} (entries were removed or the head was rewritten)",
            recorded.seq
        ));
    }
    let mut heads = read_all(data).map_err(|e| e.to_string())?;
    let anchor = match anchor {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let line = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Some(SignedHead::parse(line).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    // The decision hashes the heads name, collected while the chain is checked.
    let wanted: std::collections::HashSet<u64> = heads
        .iter()
        .chain(anchor.iter())
        .map(|h| h.statement.decision_seq)
        .collect();
    let mut decision_hashes = std::collections::HashMap::new();
    let records = match DecisionLog::verify_with(&data.join("decisions"), &mut |seq, hash| {
        if wanted.contains(&seq) {
            decision_hashes.insert(seq, *hash);
        }
    })
    .map_err(|e| e.to_string())?
    {
        ChainCheck::Intact { records } => records,
        ChainCheck::Broken { seq, reason } => {
            return Err(format!("decision chain broken at record {seq}: {reason}"))
        }
    };
    let checkpoint = store
        .ledger_checkpoint("9999-12-31")
        .map_err(|e| e.to_string())?
        .through_seq;
    if checkpoint > records {
        return Err(format!(
            "decision chain broken: the ledger checkpoint covers record {checkpoint}, but the \
             log ends at record {records} (records were removed)"
        ));
    }
    let mut summary =
        format!("audit log intact: {entries} change entries, {records} decision records");
    if heads.is_empty() && anchor.is_none() {
        if entries + records > 0 && !allow_unsigned {
            return Err(format!(
                "{summary}, but no signed head: {} is missing or empty, so tampering could not \
                 be told from accidents. A running payra signs one every \
                 audit.head_interval_s and at shutdown; for a restored backup or a server \
                 killed before its first head, pass --allow-unsigned",
                payra::store::audit_heads::HEADS_FILE
            ));
        }
        println!("{summary}; no signed head, so only accidents, not tampering, would show");
        return Ok(());
    }
    let issuing = payra::ca::pki::read_certificate_der(&certs.join("issuing.pem"))
        .map_err(|e| format!("{e} (signed heads are checked under issuing.pem; pass --certs)"))?;
    let public_key =
        payra::ca::pki::certificate_public_key_sec1(&issuing).map_err(|e| e.to_string())?;
    let decision_hash_at = |seq: u64| decision_hashes.get(&seq).copied();
    let mut previous = (0, 0);
    for (n, head) in heads.iter().enumerate() {
        let at = (head.statement.change_seq, head.statement.decision_seq);
        if at.0 < previous.0 || at.1 < previous.1 {
            return Err(format!(
                "signed head {} of {}: it goes back from the head before it",
                n + 1,
                payra::store::audit_heads::HEADS_FILE
            ));
        }
        previous = at;
        if let Some(why) = check_head(
            head,
            &public_key,
            entries,
            records,
            &change_hash_at,
            &decision_hash_at,
        ) {
            return Err(format!(
                "signed head {} (signed at {} Unix ms) does not hold: {why}",
                n + 1,
                head.statement.signed_at_ms
            ));
        }
    }
    if let Some(anchor) = &anchor {
        if let Some(why) = check_head(
            anchor,
            &public_key,
            entries,
            records,
            &change_hash_at,
            &decision_hash_at,
        ) {
            return Err(format!("the anchor does not hold: {why}"));
        }
        let newest = heads.iter().map(|h| h.statement.signed_at_ms).max();
        if newest.is_none_or(|t| t < anchor.statement.signed_at_ms) {
            return Err(
                "the anchor is newer than every signed head in the data: signed heads were \
                 removed"
                    .into(),
            );
        }
        summary.push_str(&format!(
            "; the anchor (change {}, decision {}) holds",
            anchor.statement.change_seq, anchor.statement.decision_seq
        ));
    }
    if let Some(latest) = heads.pop() {
        let s = &latest.statement;
        summary.push_str(&format!(
            "; {} signed heads hold, the latest covers change entry {} and decision record {} \
             ({} and {} after it are not signed yet)",
            heads.len() + 1,
            s.change_seq,
            s.decision_seq,
            entries - s.change_seq,
            records - s.decision_seq
        ));
    }
    println!("{summary}");
    Ok(())
}

pub(crate) fn audit(command: AuditCommand) -> CliResult {
    use payra::store::{DecisionLog, Store};
    match command {
        AuditCommand::Verify {
            store_url: Some(url),
            ..
        } => audit_verify_postgres(url),
        AuditCommand::Verify {
            data,
            certs,
            anchor,
            allow_unsigned,
            store_url: None,
        } => audit_verify(&data, &certs, anchor.as_deref(), allow_unsigned),
        AuditCommand::Head { data } => {
            let heads = payra::store::audit_heads::read_all(&data).map_err(|e| e.to_string())?;
            let Some(latest) = heads.last() else {
                return Err(format!(
                    "{} holds no signed audit head yet (payra signs one every \
                     audit.head_interval_s while it runs, and at shutdown)",
                    data.display()
                ));
            };
            println!("{}", latest.to_line().map_err(|e| e.to_string())?);
            Ok(())
        }
        AuditCommand::Tail {
            data,
            lines,
            decisions: true,
        } => {
            let records = DecisionLog::tail(&data.join("decisions"), lines as usize)
                .map_err(|e| e.to_string())?;
            for (seq, record) in records {
                let line = serde_json::json!({ "seq": seq, "record": record });
                println!("{line}");
            }
            Ok(())
        }
        AuditCommand::Tail { data, lines, .. } => {
            let store = payra::store::read_only::open_copy(&data).map_err(|e| e.to_string())?;
            let head = store.audit_head().map_err(|e| e.to_string())?.seq;
            let after = head.saturating_sub(lines);
            let entries = store
                .audit_entries(after, usize::try_from(lines).unwrap_or(usize::MAX))
                .map_err(|e| e.to_string())?;
            for entry in entries {
                println!(
                    "{}",
                    serde_json::to_string(&entry).map_err(|e| e.to_string())?
                );
            }
            Ok(())
        }
    }
}

/// `payra audit verify --store-url`: the change chain and every decision chain in
/// PostgreSQL, read while the servers run.
pub(crate) fn audit_verify_postgres(url: String) -> CliResult {
    let config = payra::config::StoreConfig {
        backend: payra::config::Backend::Postgres,
        url: Some(url),
        ..Default::default()
    };
    let store = payra::store::PgStore::connect(&config).map_err(|e| e.to_string())?;
    let changes = match payra::store::verify_audit_log(&store).map_err(|e| e.to_string())? {
        payra::store::AuditCheck::Intact { entries } => entries,
        broken => return Err(format!("the change chain is broken: {broken:?}")),
    };
    let decisions = store
        .verify_decision_chains()
        .map_err(|e| e.to_string())?
        .map_err(|why| format!("a decision chain is broken: {why}"))?;
    println!(
        "change chain: {changes} entries intact; decision chains: {decisions} decisions intact"
    );
    println!(
        "note: signed heads are not kept in PostgreSQL yet; this proves the chains are \
         consistent, not that no one with write access to the database rewrote them"
    );
    Ok(())
}
