//! What training needs of the model: a training forward pass ([`Training`]: transformers'
//! `model.train()`, with dropout at T5's places, the router's jitter, and the router logits of
//! every sparse layer kept for the router losses), and the parameters handed out one by one
//! ([`ParamMut`], walked by `HfSwitchTransformer::visit_params`).
//!
//! ```text
//! dropout(x) = x * mask / (1 - p),  mask ~ Bernoulli(1 - p)       p = dropout_rate
//!   after the embedding, on attention probabilities, on each sublayer's output before the
//!   residual add, after relu inside every FFN (experts too), after the final norm
//! jitter(x)  = x * U(1 - eps, 1 + eps)                             eps = router_jitter_noise
//!   on a sparse layer's normed input, before the router and the experts (transformers
//!   multiplies in place, so the experts see it too)
//! ```
//! The masks come from the run's seeded generator ([`RoutingRng`]), so a run reproduces; they
//! are drawn in f32 and cast to the activations' type.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::model::precision::cast_to;
use crate::model::switch::noise::{block_dropout_mask, uniform_tensor};
use crate::routing::RoutingRng;

/// A training pass's noise and what it records.
pub struct Training {
    /// Dropout probability (`dropout_rate`); 0 turns dropout off.
    pub dropout: f64,
    /// Router jitter (`router_jitter_noise`); 0 turns it off.
    pub jitter: f64,
    /// The generator of the masks and the jitter.
    pub rng: RoutingRng,
    /// `[b, s, n_experts]` router logits of every sparse layer run in this pass, encoder
    /// layers first, in order.
    pub router_logits: Vec<Tensor<3>>,
}

impl Training {
    /// A pass with this dropout and jitter, drawing from `rng`.
    pub fn new(dropout: f64, jitter: f64, rng: RoutingRng) -> Self {
        Self {
            dropout,
            jitter,
            rng,
            router_logits: Vec::new(),
        }
    }

    /// `x` with dropout applied.
    pub(crate) fn dropout<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        if self.dropout <= 0.0 {
            return x;
        }
        let mask = block_dropout_mask(&mut self.rng, x.dims(), self.dropout, &x.device());
        let dtype = x.dtype();
        x * cast_to(mask, dtype)
    }

    /// `x` times uniform noise in `[1 - jitter, 1 + jitter)`.
    pub(crate) fn jitter<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        if self.jitter <= 0.0 {
            return x;
        }
        let noise = uniform_tensor(
            &mut self.rng,
            x.dims(),
            1.0 - self.jitter,
            1.0 + self.jitter,
            &x.device(),
        );
        let dtype = x.dtype();
        x * cast_to(noise, dtype)
    }
}

/// Dropout when training, the identity otherwise.
pub(crate) fn dropout<const D: usize>(
    x: Tensor<D>,
    train: &mut Option<&mut Training>,
) -> Tensor<D> {
    match train {
        Some(t) => t.dropout(x),
        None => x,
    }
}

/// One parameter, handed out to change.
pub enum ParamMut<'a> {
    /// A vector: a norm's scale, a router's bias.
    Vector(&'a mut Tensor<1>),
    /// A matrix. `linear`: stored `[in, out]`, transposed from transformers' `[out, in]`.
    Matrix {
        /// The tensor.
        tensor: &'a mut Tensor<2>,
        /// Whether it is a linear layer's weight (stored transposed).
        linear: bool,
    },
}

impl ParamMut<'_> {
    /// The parameter's values, read back (from the device where it is elsewhere).
    pub fn data(&self) -> burn::tensor::TensorData {
        match self {
            ParamMut::Vector(t) => (*t).clone().into_data(),
            ParamMut::Matrix { tensor, .. } => (*tensor).clone().into_data(),
        }
    }
}

/// What visits each parameter: its transformers name and the tensor.
pub type Visit<'v> = dyn FnMut(&str, ParamMut<'_>) -> Result<()> + 'v;
