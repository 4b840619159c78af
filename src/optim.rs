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
use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::store::{HostTensor, host_f32};
use crate::util::written_by;

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

    /// Replaces every gradient by `f(gradient)`.
    pub fn map(&mut self, mut f: impl FnMut(Tensor<1>) -> Tensor<1>) {
        for g in &mut self.grads {
            *g = f(g.clone());
        }
    }

    /// The gradients with their parameters' ids, in module order.
    pub fn into_parts(self) -> Vec<(ParamId, Tensor<1>)> {
        let mut ids: Vec<(usize, ParamId)> =
            self.index.into_iter().map(|(id, i)| (i, id)).collect();
        ids.sort_by_key(|&(i, _)| i);
        ids.into_iter().map(|(_, id)| id).zip(self.grads).collect()
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

    /// L2 norm over all gradients together (one read back to the host; on the CPU backend a
    /// pass over the gradients' storage, accumulated in f64).
    pub fn global_norm(&self) -> f64 {
        if self.grads.iter().all(on_flex_f32) {
            let total: f64 = self
                .grads
                .iter()
                .map(|g| {
                    let g = flex(g.clone());
                    sum_squares(contiguous_f32(&g))
                })
                .sum();
            return total.sqrt();
        }
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
        let coef = clip_coefficient(norm, max_norm);
        if coef < 1.0 {
            for g in &mut self.grads {
                *g = g.clone() * coef;
            }
        }
        norm
    }
}

/// PyTorch `clip_grad_norm_`'s factor for gradients of global norm `norm`:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Whether `t` lives on the CPU backend in f32, where the optimizer works on the storage itself.
fn on_flex_f32(t: &Tensor<1>) -> bool {
    t.device() == Device::flex() && t.dtype() == DType::F32
}

/// The CPU backend's tensor behind `t` (shares its storage; needs [`on_flex_f32`]).
fn flex(t: Tensor<1>) -> FlexTensor {
    let t = if t.is_autodiff() { t.inner() } else { t };
    let t = t
        .try_into_primitive::<Flex>()
        .expect("a tensor on the flex backend");
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// The `n` values of a contiguous 1-D f32 [`FlexTensor`] (its buffer may be longer).
fn contiguous_f32(t: &FlexTensor) -> &[f32] {
    let n = t.layout().shape().num_elements();
    &t.storage::<f32>()[..n]
}

/// Sum of squares in f64, in parallel over large tensors. Eight partial sums, so that the loop
/// runs in vector registers instead of waiting on one chain of dependent additions.
fn sum_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    let part = |c: &[f32]| {
        let mut acc = [0.0f64; 8];
        let mut lanes = c.chunks_exact(8);
        for l in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(l) {
                *a += (v as f64) * (v as f64);
            }
        }
        let tail: f64 = lanes
            .remainder()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        acc.iter().sum::<f64>() + tail
    };
    if x.len() > 2 * CHUNK {
        x.par_chunks(CHUNK).map(part).sum()
    } else {
        part(x)
    }
}

/// Elements per parallel task of the CPU update.
const CHUNK: usize = 1 << 15;

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

/// Adam's coefficients for one step, rounded once to f32 (`1 - b1` computed in f64, as PyTorch
/// computes `alpha` in Python).
#[derive(Clone, Copy)]
struct Coefs {
    c1: f32,
    d1: f32,
    c2: f32,
    d2: f32,
    eps: f32,
    step_size: f32,
    /// Applied to the gradient first (the clip factor).
    grad_scale: f32,
}

/// Where the CPU update writes the new parameter values.
enum Theta<'a> {
    /// Over the old ones (storage held by no one else).
    InPlace(&'a mut [f32]),
    /// To a new buffer, not written yet (the old storage is shared, e.g. with another replica).
    Into {
        old: &'a [f32],
        new: &'a mut [MaybeUninit<f32>],
    },
}

/// One fused Adam update on the CPU: the same arithmetic as the tensor path, in one pass.
fn fused_update(theta: Theta, g: &[f32], m: &mut [f32], v: &mut [f32], k: Coefs) {
    use rayon::prelude::*;
    // The amount subtracted from one parameter; updates its moments.
    let delta = |g: f32, m: &mut f32, v: &mut f32| {
        let g = g * k.grad_scale;
        *m = k.c1 * *m + k.d1 * g;
        *v = k.c2 * *v + k.d2 * (g * g);
        (*m * k.step_size) / (v.sqrt() + k.eps)
    };
    // Zipped iterators (no bounds checks), so that the loops compile to vector instructions:
    // indexed, they ran one element at a time, at 30% of a 64-expert step.
    let into = |o: &mut [MaybeUninit<f32>], t: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        let moments = m.iter_mut().zip(v.iter_mut());
        for (((o, &t), &g), (m, v)) in o.iter_mut().zip(t).zip(g).zip(moments) {
            o.write(t - delta(g, m, v));
        }
    };
    let in_place = |t: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        let moments = m.iter_mut().zip(v.iter_mut());
        for ((t, &g), (m, v)) in t.iter_mut().zip(g).zip(moments) {
            *t -= delta(g, m, v);
        }
    };
    let n = g.len();
    let theta_fits = match &theta {
        Theta::InPlace(t) => t.len() == n,
        Theta::Into { old, new } => old.len() == n && new.len() == n,
    };
    // The loops zip the slices: a shorter one would leave values of `new` unwritten.
    assert!(
        theta_fits && m.len() == n && v.len() == n,
        "Adam on slices of different lengths"
    );
    let parallel = n > 2 * CHUNK;
    let moments = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK));
    match theta {
        Theta::Into { old, new } if parallel => new
            .par_chunks_mut(CHUNK)
            .zip(old.par_chunks(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .zip(moments)
            .for_each(|(((o, t), g), (m, v))| into(o, t, g, m, v)),
        Theta::Into { old, new } => into(new, old, g, m, v),
        Theta::InPlace(t) if parallel => t
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(moments)
            .for_each(|((t, g), (m, v))| in_place(t, g, m, v)),
        Theta::InPlace(t) => in_place(t, g, m, v),
    }
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
        self.step_scaled(module, grads, lr, 1.0)
    }

    /// [`step`](Self::step) on `grad_scale * grads` (the clip factor, applied in the same pass).
    pub fn step_scaled<M: Module>(
        &mut self,
        module: M,
        grads: &ParamGrads,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr * (1.0 - self.beta2.powf(t)).sqrt() / (1.0 - self.beta1.powf(t));
        let mut mapper = Update {
            adam: self,
            grads,
            step_size,
            grad_scale,
            path: Vec::new(),
        };
        module.map(&mut mapper)
    }

    /// Checks that every moment restored by [`load_state_tensors`](Self::load_state_tensors)
    /// belongs to a trainable parameter of `module` with as many values.
    pub fn check_matches<M: Module>(&self, module: &M) -> anyhow::Result<()> {
        #[derive(Default)]
        struct Sizes {
            path: Vec<String>,
            sizes: HashMap<String, usize>,
        }
        impl ModuleVisitor for Sizes {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.is_require_grad() {
                    let n = param.shape().num_elements();
                    self.sizes.insert(self.path.join("."), n);
                }
            }
        }
        let mut v = Sizes::default();
        module.visit(&mut v);
        for (path, moments) in &self.state {
            let n = match moments {
                Moments::Host { m, .. } => m.len(),
                Moments::Device { m, .. } => m.shape().num_elements(),
            };
            match v.sizes.get(path) {
                None => anyhow::bail!("optimizer state `{path}` is for no parameter of the model"),
                Some(&p) if p != n => anyhow::bail!(
                    "optimizer state `{path}` has {n} values, the model's parameter {p}"
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The moments as host tensors named `m.<path>` / `v.<path>`, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, HostTensor)> {
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
    pub fn load_state_tensors(
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

struct Update<'a> {
    adam: &'a mut LabmlAdam,
    grads: &'a ParamGrads,
    step_size: f64,
    grad_scale: f64,
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
        let device = theta.device();
        let g = g.clone();
        let (b1, b2) = (self.adam.beta1, self.adam.beta2);
        let key = self.path.join(".");
        let state = self.adam.state.remove(&key);
        let (theta, moments) = if on_flex_f32(&theta) && on_flex_f32(&g) {
            let (mut m, mut v) =
                state.map_or_else(|| (vec![0.0; n], vec![0.0; n]), Moments::into_host);
            let k = Coefs {
                c1: b1 as f32,
                d1: (1.0 - b1) as f32,
                c2: b2 as f32,
                d2: (1.0 - b2) as f32,
                eps: self.adam.eps as f32,
                step_size: self.step_size as f32,
                grad_scale: self.grad_scale as f32,
            };
            let g = flex(g);
            let mut th = flex(theta);
            let theta = if th.is_unique() && th.storage::<f32>().len() == n {
                fused_update(
                    Theta::InPlace(th.storage_mut()),
                    contiguous_f32(&g),
                    &mut m,
                    &mut v,
                    k,
                );
                Tensor::from_primitive::<Flex>(th)
            } else {
                let (old, g) = (contiguous_f32(&th), contiguous_f32(&g));
                let fill = |new: &mut [MaybeUninit<f32>]| {
                    fused_update(Theta::Into { old, new }, g, &mut m, &mut v, k)
                };
                // SAFETY: `fused_update` writes all of `new` (it asserts `n` values everywhere).
                let new = unsafe { written_by(n, fill) };
                Tensor::from_data(TensorData::new(new, [n]), &device)
            };
            (theta, Moments::Host { m, v })
        } else {
            let g = if self.grad_scale == 1.0 {
                g
            } else {
                g * self.grad_scale
            };
            let (m, v) = match state.map(|s| s.into_device(&device)) {
                Some((m, v)) => (
                    m * b1 + g.clone() * (1.0 - b1),
                    v * b2 + g.clone().square() * (1.0 - b2),
                ),
                None => (g.clone() * (1.0 - b1), g.square() * (1.0 - b2)),
            };
            let denom = v.clone().sqrt() + self.adam.eps;
            let theta = theta - (m.clone() * self.step_size) / denom;
            (theta, Moments::Device { m, v })
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut rand_chacha::ChaCha8Rng, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// The fused loop against the formula written out one element at a time (same f32
    /// operations in the same order, so equal bit for bit), in place and into a new buffer,
    /// below and above the parallel threshold, with a tail that is not a multiple of a chunk.
    #[test]
    fn fused_update_equals_the_formula() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let k = Coefs {
            c1: 0.9,
            d1: 0.1,
            c2: 0.999,
            d2: (1.0 - 0.999f64) as f32,
            eps: 1e-8,
            step_size: 3e-4,
            grad_scale: 0.37,
        };
        for n in [5, 1000, 2 * CHUNK + 12_345] {
            let theta = random(n, &mut rng, 1.0);
            let g = random(n, &mut rng, 0.1);
            let m0 = random(n, &mut rng, 0.01);
            let v0: Vec<f32> = random(n, &mut rng, 1e-3).iter().map(|x| x.abs()).collect();

            let (mut want_t, mut want_m, mut want_v) = (theta.clone(), m0.clone(), v0.clone());
            for i in 0..n {
                let gi = g[i] * k.grad_scale;
                want_m[i] = k.c1 * want_m[i] + k.d1 * gi;
                want_v[i] = k.c2 * want_v[i] + k.d2 * (gi * gi);
                want_t[i] -= (want_m[i] * k.step_size) / (want_v[i].sqrt() + k.eps);
            }

            let (mut t, mut m, mut v) = (theta.clone(), m0.clone(), v0.clone());
            fused_update(Theta::InPlace(&mut t), &g, &mut m, &mut v, k);
            assert_eq!(
                (&t, &m, &v),
                (&want_t, &want_m, &want_v),
                "in place, n = {n}"
            );

            let mut new = vec![MaybeUninit::new(f32::NAN); n];
            let (mut m, mut v) = (m0.clone(), v0.clone());
            let old = theta.clone();
            fused_update(
                Theta::Into {
                    old: &old,
                    new: &mut new,
                },
                &g,
                &mut m,
                &mut v,
                k,
            );
            // SAFETY: every value was initialised (NaN), then overwritten.
            let new: Vec<f32> = new
                .into_iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            assert_eq!((&new, &m, &v), (&want_t, &want_m, &want_v), "into, n = {n}");
            assert_eq!(old, theta);
        }
    }

    #[test]
    fn param_grads_into_parts_keeps_module_order() {
        let device = Device::default();
        let t = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), &device);
        let ids = [ParamId::new(), ParamId::new(), ParamId::new()];
        let mut grads = ParamGrads::default();
        for (i, &id) in ids.iter().enumerate() {
            grads.insert(id, t(i as f32));
        }
        grads.insert(ids[1], t(7.0)); // replaced, keeps its place
        let parts = grads.into_parts();
        let got: Vec<(ParamId, f32)> = parts
            .into_iter()
            .map(|(id, g)| (id, g.into_scalar()))
            .collect();
        assert_eq!(got, vec![(ids[0], 0.0), (ids[1], 7.0), (ids[2], 2.0)]);
    }

    #[test]
    fn sum_squares_matches_a_plain_sum() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for n in [0, 7, 8, 1001, 2 * CHUNK + 3] {
            let x = random(n, &mut rng, 2.0);
            let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let got = sum_squares(&x);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "n = {n}: {got} vs {want}"
            );
        }
    }
}
