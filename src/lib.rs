//! A Switch Transformer (Fedus, Zoph, Shazeer 2021) on Burn, numerically faithful to labml's
//! PyTorch miniature (`labml_nn.transformers.switch`).
//!
//! Folders by concept, imports flowing one way (each uses only those above it):
//!
//! | module | what |
//! |---|---|
//! | [`util`], [`store`], [`device`], `launches` | atomic writes; host tensors and safetensors files; device names and the paths each device takes; kernel launches and host syncs counted |
//! | [`distributed`] | the exchanges between the ranks of a job (MPI, or threads in tests) |
//! | [`cpu`] | the CPU fast paths (kernels with hand-written backward, fused Adam): the one place that decides where they apply |
//! | [`routing`] | the router, capacity and drop policies, the routing decision (host, device, routing groups) |
//! | [`model`] | attention, experts, the Switch layer, blocks, the whole model, its losses and configuration |
//! | [`optim`] | labml's Adam, the Noam schedule, gradients and the global-norm clip |
//! | [`interop`] | the model as a PyTorch state dict, labml's initialisation, parity with PyTorch |
//! | [`data`] | character-level text, windows and batches |
//! | [`infer`] | generation with a key/value cache, the CPU decoder |
//! | [`hf`] | Hugging Face Switch Transformers checkpoints (T5-style encoder-decoder), as transformers computes them |
//! | [`train`] | one step, data-parallel replicas, the trainer loop, checkpoints, evaluation |
//! | [`tools`] | throughput and memory benchmarks (the dense-vs-Switch comparison and the reports are the binary's) |
//!
//! A Switch layer for any Burn model: [`model::SwitchFeedForwardConfig`]
//! (`examples/switch_layer.rs`); the trainer from code: `examples/train_char_lm.rs`.

#![warn(missing_docs)]

pub mod cpu;
pub mod data;
pub mod device;
pub mod distributed;
pub mod hf;
pub mod infer;
pub mod interop;
pub(crate) mod launches;
pub mod model;
pub mod optim;
pub mod routing;
pub mod store;
pub mod tools;
pub mod train;
pub mod util;

pub use model::{ModelConfig, SwitchFeedForward, SwitchFeedForwardConfig, SwitchTransformer};
pub use routing::RoutingRng;
