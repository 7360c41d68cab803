//! bone-tool: merge, unmerge and inspect PEFT Bone / MiSS adapters, streaming and bit-for-bit
//! faithful to PEFT 0.18.1.
//!
//! Dependencies point one way: [`cli`] → [`commands`] → [`plan`] and [`execute`] → the readers
//! ([`model`], [`adapter`]) and the math ([`ops`]).

pub mod adapter;
pub mod backend;
pub mod cli;
pub mod commands;
pub mod error;
pub mod execute;
pub mod model;
pub mod ops;
pub mod plan;
pub mod report;
