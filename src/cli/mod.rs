//! The `payra` command line: the arguments (`args`), then one file per command group; `main.rs`
//! parses and dispatches.

pub mod args;
pub mod audit;
pub mod backup;
#[cfg(feature = "bench")]
pub mod bench;
pub mod certificates;
pub mod connection;
pub mod devices;
pub mod evidence;
pub mod human;
pub mod limits;
pub mod retention;
pub mod server;
pub mod tokens;
