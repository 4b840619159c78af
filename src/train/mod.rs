//! Training: [`step`] (one optimizer step: forward, losses, backward, clip, Adam) on the
//! [`replicas`] of the model (where they run: [`placement`]; what differs between one model,
//! threads and ranks: `strategy`, with the gradient sums of `reduce`), driven by the
//! `trainer` loop with its [`config`], [`eval`]uation and [`checkpoint`]s, in a `run_dir`
//! whose `metrics` are typed lines; across the ranks of a job the experts may be sharded
//! (`expert_parallel`).

pub mod checkpoint;
pub mod config;
pub mod eval;
pub(crate) mod expert_parallel;
pub(crate) mod lock;
pub mod memory;
pub(crate) mod metrics;
pub mod placement;
pub(crate) mod reduce;
pub(crate) mod replica;
pub mod replicas;
pub(crate) mod run_dir;
pub mod step;
pub(crate) mod strategy;
pub(crate) mod trainer;
pub mod upcycle;

pub use config::{RunConfig, TrainConfig};
pub use metrics::{MetricsLine, TrainLine, ValidLine};
pub use run_dir::{DataRecord, RunDir, load_run_model};
pub use trainer::{Event, Finish, StepMetrics, Trainer};
