//! The load harness behind `sluice-load`: a mock upstream, an open-loop
//! generator, the systems under test (with a bare proxy on sluice's own
//! stack), process statistics, and rollback-under-load trials.

pub mod gen;
pub mod mock;
pub mod passthrough;
pub mod procstat;
pub mod rollback;
pub mod run;
pub mod targets;
