//! Tools around training: throughput and memory benchmarks ([`mod@bench`]), the dense-vs-Switch
//! [`compare`] experiment, and the HTML [`report`] of runs with its `svg` charts.

pub mod bench;
pub mod compare;
pub mod report;
pub(crate) mod svg;
