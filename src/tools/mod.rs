//! Tools around training: throughput and memory benchmarks ([`mod@bench`]), which the tests of
//! the exchanges between ranks also run. The dense-vs-Switch comparison and the HTML reports,
//! which only the `switch` binary runs, are part of it (`src/cli/`).

pub mod bench;
