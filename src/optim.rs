//! labml's optimizer as the experiment configures it: Adam with eps added to `sqrt(v)` before
//! the bias correction, under the Noam learning-rate schedule, after PyTorch-style global-norm
//! gradient clipping (`clip_grad_norm_`: one norm over all gradients, not one per tensor).
//!
//! ```text
//! lr_t  = lr * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)
//! m_t   = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2
//! theta = theta - lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)
//! ```

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor};
use serde::{Deserialize, Serialize};

use crate::store::HostTensor;

/// Noam schedule (labml `Noam.get_lr`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Noam {
    pub lr: f64,
    pub warmup: u64,
    pub d_model: usize,
}

impl Noam {
    /// Learning rate at step `t` (1-based: the first update uses `t = 1`).
    pub fn lr(&self, t: u64) -> f64 {
        let t = t.max(1) as f64;
        let factor = t.powf(-0.5).min(t * (self.warmup as f64).powf(-1.5));
        self.lr * (self.d_model as f64).powf(-0.5) * factor
    }
}

/// Gradients of a module's parameters, flattened, in module order (so that reductions over
/// them, like the global norm, add up in the same order every run).
#[derive(Default)]
pub struct ParamGrads {
    grads: Vec<Tensor<1>>,
    index: HashMap<ParamId, usize>,
}

impl ParamGrads {
    /// Takes every parameter gradient of `module` out of `grads`.
    pub fn from_gradients<M: Module>(module: &M, mut grads: Gradients) -> Self {
        struct Collect<'a> {
            grads: &'a mut Gradients,
            out: ParamGrads,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if !param.is_require_grad() {
                    return;
                }
                if let Some(g) = param.val().grad_remove(self.grads) {
                    let n = g.shape().num_elements();
                    self.out.insert(param.id, g.reshape([n]));
                }
            }
        }
        let mut c = Collect {
            grads: &mut grads,
            out: ParamGrads::default(),
        };
        module.visit(&mut c);
        c.out
    }

    pub fn insert(&mut self, id: ParamId, grad: Tensor<1>) {
        match self.index.get(&id) {
            Some(&i) => self.grads[i] = grad,
            None => {
                self.index.insert(id, self.grads.len());
                self.grads.push(grad);
            }
        }
    }

    pub fn get(&self, id: &ParamId) -> Option<&Tensor<1>> {
        self.index.get(id).map(|&i| &self.grads[i])
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// L2 norm over all gradients together (one read back to the host).
    pub fn global_norm(&self) -> f64 {
        let squares: Vec<Tensor<1>> = self
            .grads
            .iter()
            .map(|g| g.clone().square().sum())
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        let total: f32 = Tensor::cat(squares, 0).sum().into_scalar();
        (total as f64).sqrt()
    }

    /// PyTorch `clip_grad_norm_(max_norm)`: scales all gradients by
    /// `min(1, max_norm / (norm + 1e-6))`; returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in &mut self.grads {
                *g = g.clone() * coef;
            }
        }
        norm
    }
}

/// Adam first and second moments of one parameter (flattened).
#[derive(Clone)]
struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

/// labml's Adam (`optimized_update=True`, weight decay 0). State is keyed by the parameter's
/// module path (`layers.0.attn.query.weight`), stable across runs, for checkpoints.
pub struct LabmlAdam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates done so far (the next update uses `step + 1`).
    pub step: u64,
    state: HashMap<String, Moments>,
}

impl Default for LabmlAdam {
    /// labml's `OptimizerConfigs` defaults: betas (0.9, 0.999), eps 1e-8.
    fn default() -> Self {
        Self::new(0.9, 0.999, 1e-8)
    }
}

impl LabmlAdam {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// One update of every parameter that has a gradient in `grads`, with learning rate `lr`.
    /// The step counter advances first, as in labml.
    pub fn step<M: Module>(&mut self, module: M, grads: &ParamGrads, lr: f64) -> M {
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t));
        let mut mapper = Update {
            adam: self,
            grads,
            step_size,
            path: Vec::new(),
        };
        module.map(&mut mapper)
    }

    /// The moments as host tensors named `m.<path>` / `v.<path>`, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        for (path, s) in &self.state {
            out.push((format!("m.{path}"), HostTensor::from_tensor(s.m.clone())));
            out.push((format!("v.{path}"), HostTensor::from_tensor(s.v.clone())));
        }
        out
    }

    /// Restores moments written by [`state_tensors`](Self::state_tensors).
    pub fn load_state_tensors(
        &mut self,
        step: u64,
        tensors: &std::collections::BTreeMap<String, HostTensor>,
        device: &burn::tensor::Device,
    ) -> anyhow::Result<()> {
        self.step = step;
        self.state.clear();
        for (name, m) in tensors {
            let Some(path) = name.strip_prefix("m.") else {
                continue;
            };
            let v = tensors.get(&format!("v.{path}")).ok_or_else(|| {
                anyhow::anyhow!("optimizer state has `m.{path}` but no `v.{path}`")
            })?;
            self.state.insert(
                path.to_string(),
                Moments {
                    m: m.to_tensor(device)?,
                    v: v.to_tensor(device)?,
                },
            );
        }
        Ok(())
    }
}

struct Update<'a> {
    adam: &'a mut LabmlAdam,
    grads: &'a ParamGrads,
    step_size: f64,
    path: Vec<String>,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.get(&param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let (autodiff, require_grad) = (tensor.is_autodiff(), tensor.is_require_grad());
        let shape = tensor.shape();
        let n = shape.num_elements();
        let theta = tensor.inner().reshape([n]);
        let g = g.clone();
        let (b1, b2) = (self.adam.beta1, self.adam.beta2);
        let key = self.path.join(".");
        let moments = match self.adam.state.remove(&key) {
            Some(s) => Moments {
                m: s.m * b1 + g.clone() * (1.0 - b1),
                v: s.v * b2 + g.clone().square() * (1.0 - b2),
            },
            None => Moments {
                m: g.clone() * (1.0 - b1),
                v: g.square() * (1.0 - b2),
            },
        };
        let denom = moments.v.clone().sqrt() + self.adam.eps;
        let theta = theta - (moments.m.clone() * self.step_size) / denom;
        self.adam.state.insert(key, moments);

        let mut updated = theta.reshape(shape);
        if autodiff {
            updated = updated.autodiff();
        }
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
