//! Customers' agreed tier-A daily limits, held in memory so that VerifyPayment and
//! QualifyTransaction read no storage. Loaded at start; a change is written durably first
//! and then made visible, before it is acknowledged.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use crate::error::Result;
use crate::model::CustomerId;
use crate::store::{AuditEvent, Store};

/// Every agreed limit, by customer id; a customer without one gets the configured default.
pub struct AgreedLimits {
    limits: RwLock<HashMap<Box<str>, i64>>,
    /// Setters take turns, so the map ends with the value the store ends with. Readers never
    /// wait for a setter's durable write, only for the insert.
    setting: Mutex<()>,
}

impl AgreedLimits {
    /// Reads every agreed limit from the store. A limit above `max_fen` (set before the
    /// maximum was lowered) still applies, and is named in a warning.
    pub fn load(store: &dyn Store, max_fen: i64) -> Result<AgreedLimits> {
        let limits: HashMap<Box<str>, i64> = store
            .agreed_limits()?
            .into_iter()
            .map(|(customer, limit)| (customer.into_boxed_str(), limit))
            .collect();
        let above = limits.values().filter(|limit| **limit > max_fen).count();
        if above > 0 {
            tracing::warn!(
                customers = above,
                max_agreed_limit_fen = max_fen,
                "agreed limits above ledger.max_agreed_limit_fen still apply; set them again \
                 with payra limits set"
            );
        }
        Ok(AgreedLimits {
            limits: RwLock::new(limits),
            setting: Mutex::new(()),
        })
    }

    /// The customer's agreed limit, if one was set.
    pub fn get(&self, customer: &CustomerId) -> Option<i64> {
        self.limits
            .read()
            .unpoisoned()
            .get(customer.as_str())
            .copied()
    }

    /// Takes every limit as the store holds it now (another payra process changed one).
    pub fn reload(&self, store: &dyn Store) -> Result<()> {
        let _turn = self.setting.lock().unpoisoned();
        let limits: HashMap<Box<str>, i64> = store
            .agreed_limits()?
            .into_iter()
            .map(|(customer, limit)| (customer.into_boxed_str(), limit))
            .collect();
        *self.limits.write().unpoisoned() = limits;
        Ok(())
    }

    /// Stores the limit durably (with its audit entry), then makes it visible.
    pub fn set(
        &self,
        store: &dyn Store,
        customer: &CustomerId,
        limit_fen: i64,
        audit: &AuditEvent,
    ) -> Result<()> {
        let _turn = self.setting.lock().unpoisoned();
        store.set_agreed_limit(customer, limit_fen, audit)?;
        self.limits
            .write()
            .unpoisoned()
            .insert(customer.as_str().into(), limit_fen);
        Ok(())
    }

    /// How many customers have an agreed limit (logged at start).
    pub fn len(&self) -> usize {
        self.limits.read().unpoisoned().len()
    }
}
