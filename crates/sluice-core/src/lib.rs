//! The pure domain of sluice: what a configuration means, what a chat request
//! and response look like on the wire, and how a streamed completion is put
//! back together.
//!
//! This crate does no I/O: no files, sockets, clocks or environment reads.
//! Callers hand it text and lookups, so everything here can be unit-, property-
//! and fuzz-tested in isolation. It depends on no other sluice crate.

pub mod assign;
pub mod chat;
pub mod config;
pub mod controller;
pub mod gate;
pub mod policy;
pub mod probe;
pub mod resilience;
pub mod rollout;
pub mod secret;
pub mod signals;
pub mod sim;
pub mod splitmix;
pub mod sse;
pub mod stats;
pub mod stream;

pub use config::{Config, ConfigError, ConfigErrors};
