//! The `payra` command line's own pieces (the commands themselves are in `main.rs`).

pub mod human;
