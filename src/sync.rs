//! Locks that survive a panic elsewhere. payra changes what a lock guards as whole values
//! (a map entry, a counter, a queue), so a thread that panicked while holding one leaves
//! nothing half-written; the next thread takes the lock as if it were not poisoned. Every
//! `std::sync` lock and condition-variable wait goes through [`Unpoisoned::unpoisoned`].

use std::sync::{LockResult, PoisonError};

/// The guard of a lock or wait result, poisoned or not.
pub trait Unpoisoned<G> {
    fn unpoisoned(self) -> G;
}

impl<G> Unpoisoned<G> for LockResult<G> {
    fn unpoisoned(self) -> G {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_taken_with_its_value() {
        let lock = std::sync::Arc::new(std::sync::Mutex::new(7));
        let held = lock.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unpoisoned();
            panic!("poisons the lock");
        })
        .join();
        assert!(lock.is_poisoned());
        assert_eq!(*lock.lock().unpoisoned(), 7);
    }
}
