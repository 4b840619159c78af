//! The integration tests, as one test binary (one link instead of one per file): each file
//! is a module, `common` holds the shared helpers. Run one module with
//! `cargo test --release --test suite -- parity::`.

mod after_paper;
mod cli;
mod cli_reliability;
mod common;
mod device_routing;
mod distributed;
mod finetune;
mod fused;
mod fuzz;
mod generate;
mod gpu;
mod hf;
mod hf_upcycle;
mod parallel;
mod parity;
mod reliability;
mod switch_layer;
mod toolkit;
mod toolkit_model;
mod train;
mod weights;
