//! The paper's released models: Hugging Face `SwitchTransformersForConditionalGeneration`
//! checkpoints (`google/switch-base-8` and up), a T5-style encoder-decoder whose feed-forward
//! networks are Switch layers in every other block, computing what transformers 5.24.0
//! computes.
//!
//! | file | what |
//! |---|---|
//! | `config` | `config.json`: widths, blocks, which are sparse, capacity |
//! | [`checkpoint`] | the safetensors weights (f32, bf16, f16, sharded) by transformers' names |
//! | `linear` | bias-free linear layers: `[in, out]` weights from PyTorch's `[out, in]` |
//! | [`sparse`] | the router (per-sequence capacity, first come first served) and the experts |
//! | [`model`] | RMS norm, relative position bias, attention (keys and values in the project's `KvCache`), blocks, encoder and decoder |
//! | [`generate`] | greedy decoding with a key/value cache, or without |
//! | [`tokenize`] | text to ids and back with the checkpoint's tokenizer.json |
//! | [`routes`] | which expert every token goes to, per sparse layer, with load and drops |
//! | [`parity`] | fixtures recorded with transformers (`tools/hf_fixtures.py`) replayed |
//! | [`training`] | a training pass (dropout, jitter, router logits) and the parameter walk |
//! | [`finetune`] | training them as transformers' `Trainer` does: loss, AdamW, runs, ROUGE |
//! | [`upcycle`] | a dense T5 checkpoint into a Switch one: experts copied from its FFNs |

pub mod checkpoint;
pub(crate) mod config;
pub mod finetune;
pub mod generate;
pub(crate) mod linear;
pub mod model;
pub mod parity;
pub mod routes;
pub mod sparse;
pub mod tokenize;
pub mod training;
pub mod upcycle;

pub use config::HfConfig;
pub use linear::matmul2;
pub use model::HfSwitchTransformer;
