//! labml's Adam (`optimized_update=True`, weight decay 0): eps added to `sqrt(v)` before the
//! bias correction. On the CPU backend each parameter is one fused pass
//! ([`crate::cpu::adam`]); elsewhere the same arithmetic in tensor ops.

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use super::ParamGrads;
use crate::cpu::adam::Coefs;
use crate::model::params;
use crate::store::{HostTensor, host_f32};

/// Adam first and second moments of one parameter (flattened).
#[allow(clippy::large_enum_variant)] // one per parameter tensor
enum Moments {
    /// On the parameter's device, updated with tensor ops (any backend).
    Device { m: Tensor<1>, v: Tensor<1> },
    /// In host memory, updated by one fused loop: used on the CPU backend, where every tensor
    /// op is a separate pass over memory (about 13 for an Adam step).
    Host { m: Vec<f32>, v: Vec<f32> },
}

impl Moments {
    fn into_host(self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Self::Host { m, v } => (m, v),
            Self::Device { m, v } => (host_f32(m), host_f32(v)),
        }
    }

    fn into_device(self, device: &Device) -> (Tensor<1>, Tensor<1>) {
        match self {
            Self::Device { m, v } => (m, v),
            Self::Host { m, v } => {
                let n = m.len();
                (
                    Tensor::from_data(TensorData::new(m, [n]), device),
                    Tensor::from_data(TensorData::new(v, [n]), device),
                )
            }
        }
    }

    fn host_tensors(&self) -> (HostTensor, HostTensor) {
        match self {
            Self::Host { m, v } => (
                HostTensor::f32(vec![m.len()], m.clone()),
                HostTensor::f32(vec![v.len()], v.clone()),
            ),
            Self::Device { m, v } => (
                HostTensor::from_tensor(m.clone()),
                HostTensor::from_tensor(v.clone()),
            ),
        }
    }
}

/// labml's Adam (`optimized_update=True`, weight decay 0). State is keyed by the parameter's
/// module path (`layers.0.attn.query.weight`), stable across runs, for checkpoints.
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use rand::SeedableRng;
/// use switch_transformer::optim::{LabmlAdam, ParamGrads};
/// use switch_transformer::{RoutingRng, SwitchFeedForwardConfig};
///
/// let device = Device::default().autodiff();
/// let mut layer = SwitchFeedForwardConfig::new(8, 16, 2).init(&device);
/// let x = Tensor::<2>::random([32, 8], Distribution::Normal(0.0, 1.0), &device);
/// let before = layer.router.switch.weight.val().into_data();
/// let loss = layer.forward(x, &mut RoutingRng::seed_from_u64(0)).out.square().mean();
/// let grads = ParamGrads::from_gradients(&layer, loss.backward());
/// let mut adam = LabmlAdam::default();
/// layer = adam.step(layer, &grads, 1e-3);
/// assert_eq!(adam.step, 1);
/// assert_ne!(layer.router.switch.weight.val().into_data(), before);
/// ```
pub struct LabmlAdam {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to `sqrt(v)`.
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
    /// Adam with these coefficients and no state yet.
    pub(crate) fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
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
        self.step_scaled(module, grads, lr, 1.0)
    }

    /// [`step`](Self::step) on `grad_scale * grads` (the clip factor, applied in the same pass).
    pub(crate) fn step_scaled<M: Module>(
        &mut self,
        module: M,
        grads: &ParamGrads,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t));
        params::map(
            module,
            |p| grads.get(&p.id).is_some(),
            |p, theta| {
                let g = grads.get(&p.id).expect("selected").clone();
                self.update(&p.path, theta, g, step_size, grad_scale)
            },
        )
    }

    /// One parameter's update: `theta` (flat, owned: updated in place on the CPU) with
    /// `grad_scale * g`, its moments kept under `path`.
    fn update(
        &mut self,
        path: &str,
        theta: Tensor<1>,
        g: Tensor<1>,
        step_size: f64,
        grad_scale: f64,
    ) -> Tensor<1> {
        let n = theta.dims()[0];
        let device = theta.device();
        let (b1, b2) = (self.beta1, self.beta2);
        let state = self.state.remove(path);
        let (theta, moments) = if crate::cpu::adam::applies(&theta, &g) {
            let (mut m, mut v) =
                state.map_or_else(|| (vec![0.0; n], vec![0.0; n]), Moments::into_host);
            let k = Coefs {
                c1: b1 as f32,
                d1: (1.0 - b1) as f32,
                c2: b2 as f32,
                d2: (1.0 - b2) as f32,
                eps: self.eps as f32,
                step_size: step_size as f32,
                grad_scale: grad_scale as f32,
            };
            let theta = crate::cpu::adam::update(theta, &g, &mut m, &mut v, k);
            (theta, Moments::Host { m, v })
        } else {
            let g = if grad_scale == 1.0 { g } else { g * grad_scale };
            let (m, v) = match state.map(|s| s.into_device(&device)) {
                Some((m, v)) => (
                    m * b1 + g.clone() * (1.0 - b1),
                    v * b2 + g.clone().square() * (1.0 - b2),
                ),
                None => (g.clone() * (1.0 - b1), g.square() * (1.0 - b2)),
            };
            let denom = v.clone().sqrt() + self.eps;
            let theta = theta - (m.clone() * step_size) / denom;
            (theta, Moments::Device { m, v })
        };
        self.state.insert(path.to_string(), moments);
        theta
    }

    /// Checks that every moment restored by [`load_state_tensors`](Self::load_state_tensors)
    /// belongs to a trainable parameter of `module` with as many values.
    pub(crate) fn check_matches<M: Module>(&self, module: &M) -> anyhow::Result<()> {
        let sizes: HashMap<String, usize> = params::trainable(module)
            .into_iter()
            .map(|p| (p.path.clone(), p.len()))
            .collect();
        for (path, moments) in &self.state {
            let n = match moments {
                Moments::Host { m, .. } => m.len(),
                Moments::Device { m, .. } => m.shape().num_elements(),
            };
            match sizes.get(path) {
                None => anyhow::bail!("optimizer state `{path}` is for no parameter of the model"),
                Some(&p) if p != n => anyhow::bail!(
                    "optimizer state `{path}` has {n} values, the model's parameter {p}"
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The module paths of the parameters that have moments (updated at least once), sorted.
    pub(crate) fn paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self.state.keys().cloned().collect();
        paths.sort();
        paths
    }

    /// A host copy of the moments `(m, v)` of parameter `path`, if it has them.
    pub(crate) fn moments(&self, path: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        self.state.get(path).map(|s| match s {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device { m, v } => (host_f32(m.clone()), host_f32(v.clone())),
        })
    }

    /// Sets the moments of parameter `path` (flattened, in host memory).
    pub(crate) fn set_moments(&mut self, path: &str, m: Vec<f32>, v: Vec<f32>) {
        self.state.insert(path.to_string(), Moments::Host { m, v });
    }

    /// The moments as host tensors named `m.<path>` / `v.<path>`, for checkpoints.
    pub(crate) fn state_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        for (path, s) in &self.state {
            let (m, v) = s.host_tensors();
            out.push((format!("m.{path}"), m));
            out.push((format!("v.{path}"), v));
        }
        out
    }

    /// Restores moments written by [`state_tensors`](Self::state_tensors). They move to the
    /// parameters' device at the next step.
    pub(crate) fn load_state_tensors(
        &mut self,
        step: u64,
        tensors: &std::collections::BTreeMap<String, HostTensor>,
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
            if m.shape.len() != 1 || v.shape != m.shape {
                anyhow::bail!(
                    "optimizer state `{path}` has shapes {:?} and {:?}",
                    m.shape,
                    v.shape
                );
            }
            self.state.insert(
                path.to_string(),
                Moments::Host {
                    m: m.to_f32(),
                    v: v.to_f32(),
                },
            );
        }
        Ok(())
    }
}
