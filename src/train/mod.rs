//! Training: [`step`] (one optimizer step: forward, losses, backward, clip, Adam) on the
//! [`replicas`] of the model, driven by the [`trainer`] loop with its [`config`], [`eval`]uation
//! and [`checkpoint`]s.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod replicas;
pub mod step;
pub mod trainer;

pub use config::{RunConfig, TrainConfig};
pub use trainer::{Event, Finish, StepMetrics, Trainer, load_run_model};
