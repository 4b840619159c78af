//! Tools around training: throughput and memory benchmarks ([`mod@bench`]), the dense-vs-Switch
//! [`compare`] experiment, and the HTML [`report`] of runs.

pub mod bench;
pub mod compare;
pub mod report;
