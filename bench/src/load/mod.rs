//! The load harness behind `sluice-load`: a mock upstream, an open-loop
//! generator, the systems under test (with a bare proxy on sluice's own
//! stack), and process statistics.

pub mod gen;
pub mod mock;
pub mod passthrough;
pub mod procstat;
pub mod run;
pub mod targets;
