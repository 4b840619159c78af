//! The Switch Transformer itself, read bottom-up: [`ops`] (the operations with a CPU fast
//! path) -> [`precision`] -> [`attention`] -> `expert`, `ffn` -> [`switch`] (the Switch layer: router,
//! capacity, experts) -> `block` -> `transformer` (the whole model) -> [`loss`]. `config`
//! describes a model; `switch_config` builds a Switch layer alone, for any Burn model; `params`
//! walks the trainable parameters of any of them.

pub mod attention;
pub(crate) mod block;
pub(crate) mod config;
pub(crate) mod expert;
pub(crate) mod ffn;
pub mod loss;
pub mod ops;
pub(crate) mod params;
pub mod precision;
pub mod switch;
pub(crate) mod switch_config;
pub(crate) mod transformer;

pub use config::{InitScheme, ModelConfig};
pub use switch::{DroppedTokens, SwitchFeedForward, SwitchOutput, SwitchStats};
pub use switch_config::SwitchFeedForwardConfig;
pub use transformer::{ModelOutput, SwitchTransformer, Trace};
