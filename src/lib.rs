//! payra: a registration authority and issuing CA for mobile-payment device certificates.
//! See docs/architecture.md for the layers; this file only names them.

// Outside tests, a failure is an `Error` with a message, never a panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod attestation;
#[cfg(feature = "bench")]
pub mod bench;
pub mod ca;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod ra;
pub mod secrets;
pub mod server;
pub mod store;
pub mod sync;
pub mod wire;

pub use error::{Error, Result};
