//! bone-tool: merge, unmerge and inspect PEFT Bone / MiSS adapters, streaming and bit-for-bit
//! faithful to PEFT 0.18.1.
//!
//! Dependencies point one way: [`cli`] → [`commands`] → [`plan`] and [`execute`] → the readers
//! ([`model`], [`adapter`]) and the math ([`ops`]).

// The library is the binary's insides, read with `cargo doc --document-private-items`: its public
// items may link to private ones.
#![allow(rustdoc::private_intra_doc_links)]

pub mod adapter;
pub mod backend;
pub mod cli;
pub mod commands;
pub mod error;
pub mod execute;
pub mod hub;
pub mod model;
pub mod ops;
pub mod plan;
pub mod report;
pub mod sys;

/// The value of environment variable `name` parsed as a `T`, for the `BONE_TOOL_*` settings that
/// tests and benchmarks turn; None when it is not set or does not parse (the default then holds).
pub(crate) fn env_setting<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}
