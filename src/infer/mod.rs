//! Inference: autoregressive [`generate`]ion with sampling and a key/value cache, and the
//! CPU [`decode`]r that runs one position with plain loops.

pub mod decode;
pub mod generate;
