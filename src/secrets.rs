//! Secrets handed to payra in its environment (the issuing key's passphrase, the PKCS#11
//! PIN). The binary takes them out of the environment before it starts any thread
//! ([`take_from_environment`]): changing the environment while other threads may read it is
//! a data race in the C library, and a child process must not inherit them. Later reads get
//! the value taken ([`env_secret`]). `/proc/PID/environ` keeps the block the process started
//! with: a secret file (mode 0600) avoids that.

use std::sync::Mutex;

use crate::sync::Unpoisoned;

/// The variables the binary takes at start; a name configured otherwise (`pkcs11.pin_env`)
/// is read, and removed, when it is first needed.
pub const ENVIRONMENT_SECRETS: [&str; 3] = [
    "PAYRA_CA_KEY_PASSPHRASE",
    "PAYRA_PKCS11_PIN",
    "PAYRA_UPSTREAM_AUTH_KEY",
];

static TAKEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Moves `names` from the environment into this process's memory. Call before any thread
/// starts.
pub fn take_from_environment(names: &[&str]) {
    let mut taken = TAKEN.lock().unpoisoned();
    for name in names {
        if let Ok(value) = std::env::var(name) {
            std::env::remove_var(name);
            taken.retain(|(taken_name, _)| taken_name != name);
            taken.push((name.to_string(), value));
        }
    }
}

/// The secret in variable `name`: the value taken at start, else the variable itself (then
/// removed). Each value is given out once.
pub fn env_secret(name: &str) -> Option<String> {
    let mut taken = TAKEN.lock().unpoisoned();
    if let Some(at) = taken.iter().position(|(taken_name, _)| taken_name == name) {
        return Some(taken.swap_remove(at).1);
    }
    let value = std::env::var(name).ok()?;
    std::env::remove_var(name);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_taken_at_start_is_given_once_and_left_no_trace_in_the_environment() {
        let name = "PAYRA_TEST_SECRET_TAKEN";
        std::env::set_var(name, "s3cret");
        take_from_environment(&[name]);
        assert!(std::env::var(name).is_err(), "gone from the environment");
        assert_eq!(env_secret(name).as_deref(), Some("s3cret"));
        assert_eq!(env_secret(name), None, "given out once");
    }
}
