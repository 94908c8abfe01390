//! The load harness behind `sluice-load`: a mock upstream, an open-loop
//! generator, the systems under test, and process statistics.

pub mod gen;
pub mod mock;
pub mod procstat;
pub mod run;
pub mod targets;
