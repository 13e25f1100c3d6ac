//! payra: a registration authority and issuing CA for mobile-payment device certificates.
//! See docs/architecture.md for the layers; this file only names them.

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
pub mod server;
pub mod store;
pub mod wire;

pub use error::{Error, Result};
