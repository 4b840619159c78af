//! A Switch Transformer (Fedus, Zoph, Shazeer 2021) on Burn, numerically faithful to labml's
//! PyTorch miniature (`labml_nn.transformers.switch`).
//!
//! Read in this order: [`router`] -> [`expert`] -> [`switch`] -> [`attention`] -> [`block`] ->
//! [`model`] -> [`loss`] -> [`optim`]. [`weights`] maps the model to PyTorch `state_dict`
//! names; [`parity`] checks it against tensors recorded from the PyTorch code. [`fused`] holds
//! the CPU kernels (attention softmax, LayerNorm, the experts' FFN) that replace chains of
//! Burn ops on the flex backend; every other backend runs the Burn-op definitions.

pub mod attention;
pub mod bench;
pub mod block;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod decode;
pub mod device;
pub mod download;
pub mod eval;
pub mod expert;
pub mod fused;
pub mod generate;
pub mod group;
pub mod init;
pub mod loss;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod parity;
pub mod precision;
pub mod report;
pub mod router;
pub mod store;
pub mod switch;
pub mod train;
pub mod util;
pub mod weights;

pub use config::ModelConfig;
pub use model::SwitchTransformer;
pub use router::RoutingRng;
