//! AdamW as PyTorch's `torch.optim.AdamW` computes it, under the linear warm-up and decay
//! schedule of transformers' `Trainer` (`get_linear_schedule_with_warmup`):
//!
//! ```text
//! theta = theta * (1 - lr_t * wd)                     (decoupled weight decay, if it decays)
//! m     = m + (1 - b1) (g - m);   v = b2 v + (1 - b2) g^2
//! theta = theta - lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! lr_t  = lr * (s < warmup ? s / warmup : max(0, (total - s) / (total - warmup)))
//!         s = t - 1: the scheduler steps after the optimizer, so the first update uses s = 0
//! ```
//! `t` counts the updates of that parameter: PyTorch skips a parameter without a gradient (an
//! expert no token reached), moments and decay included. On the CPU the update is one fused
//! pass over host buffers ([`AdamW::update`]); on other backends the same arithmetic in tensor
//! ops with the moments on the device ([`AdamW::update_tensor`]: no host round trip per
//! update, and the backend fuses the element-wise ops). `Trainer` decays every parameter but
//! biases and norms (names with `bias`, `layernorm`, `rmsnorm`, `_norm.`, or a `norm` path
//! component): [`decays`].

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::store::host_f32;

/// `Trainer`'s linear schedule: the factor of the base rate for update `t` (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// Updates of linear warm-up from 0.
    pub warmup: u64,
    /// Updates in all: the rate reaches 0 at the last.
    pub total: u64,
}

impl LinearSchedule {
    /// The factor for update `t` (1-based).
    pub fn factor(&self, t: u64) -> f64 {
        let s = t.saturating_sub(1);
        if s < self.warmup {
            return s as f64 / self.warmup.max(1) as f64;
        }
        let left = self.total.saturating_sub(s) as f64;
        (left / self.total.saturating_sub(self.warmup).max(1) as f64).max(0.0)
    }
}

/// Whether `Trainer` applies weight decay to the parameter named `name`.
pub fn decays(name: &str) -> bool {
    let n = name.to_lowercase();
    let norm_part = n.split('.').any(|p| p == "norm");
    !(n.contains("bias")
        || n.contains("layernorm")
        || n.contains("rmsnorm")
        || n.contains("_norm.")
        || n.ends_with("_norm")
        || norm_part)
}

/// AdamW's settings (PyTorch's and `Trainer`'s defaults: betas 0.9 / 0.999, eps 1e-8, no
/// weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected `sqrt(v)`.
    pub eps: f64,
    /// Decoupled weight decay (times the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter's state: its moments (flattened) and its update count.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    /// First moment, on the host (empty while the moments are on the device).
    pub m: Vec<f32>,
    /// Second moment, likewise.
    pub v: Vec<f32>,
    /// Updates of this parameter.
    pub step: u64,
    /// Both moments on the parameter's device, for [`AdamW::update_tensor`].
    pub device: Option<(Tensor<1>, Tensor<1>)>,
}

impl Moments {
    /// Both moments on the host, wherever they are kept.
    pub fn host(&self) -> (Vec<f32>, Vec<f32>) {
        match &self.device {
            Some((m, v)) => (host_f32(m.clone()), host_f32(v.clone())),
            None => (self.m.clone(), self.v.clone()),
        }
    }
}

/// The state of every parameter, by its index in a fixed walk.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Settings.
    pub config: AdamWConfig,
    /// Per parameter.
    pub state: Vec<Moments>,
}

impl AdamW {
    /// An optimizer with no state.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: Vec::new(),
        }
    }

    /// Zeroed host moments for each parameter of `sizes` (elements, in the walk's order) that
    /// has none yet. Called before the first gradients of a run exist, so that the moments
    /// (twice the model) take their memory first and every update's gradients reuse one
    /// region. Allocated inside the first update instead, they took the memory its gradients
    /// freed, and the second update's gradients were fresh pages, touched for the first time
    /// there: fine-tuning a switch-base-8-shaped model on a 2-core AMD EPYC, that update took
    /// 7.8 s instead of 2.3. It does not lower peak memory (0.16 GB higher in two pairs of
    /// runs).
    pub fn reserve(&mut self, sizes: &[usize]) {
        if self.state.len() < sizes.len() {
            self.state.resize_with(sizes.len(), Default::default);
        }
        for (s, &n) in self.state.iter_mut().zip(sizes) {
            if s.m.is_empty() && s.device.is_none() {
                (s.m, s.v) = (vec![0.0; n], vec![0.0; n]);
            }
        }
    }

    /// Updates parameter number `i` (`param` and `grad` flattened alike) with learning rate
    /// `lr`, the gradient times `scale` (a clipping coefficient; 1 for none); `decay`: whether
    /// weight decay applies to it. One pass over the four buffers, on every core.
    pub fn update(
        &mut self,
        i: usize,
        param: &mut [f32],
        grad: &[f32],
        scale: f32,
        lr: f64,
        decay: bool,
    ) {
        assert_eq!(param.len(), grad.len(), "parameter {i}: gradient size");
        if self.state.len() <= i {
            self.state.resize_with(i + 1, Default::default);
        }
        if let Some((m, v)) = self.state[i].device.take() {
            (self.state[i].m, self.state[i].v) = (host_f32(m), host_f32(v));
        }
        let Moments { m, v, step, .. } = &mut self.state[i];
        if m.is_empty() {
            *m = vec![0.0; param.len()];
            *v = vec![0.0; param.len()];
        }
        assert_eq!(m.len(), param.len(), "parameter {i}: size changed");
        *step += 1;
        let k = self.config.step(*step, scale, lr, decay);
        let chunk = 1 << 16;
        param
            .par_chunks_mut(chunk)
            .zip(grad.par_chunks(chunk))
            .zip(m.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .for_each(|(((param, grad), m), v)| fused(param, grad, m, v, &k));
    }

    /// [`Self::update`] in tensor ops on `param`'s device (any backend): returns the updated
    /// parameter; the moments stay on the device (moved there from the host at the first
    /// call after a restore).
    pub fn update_tensor(
        &mut self,
        i: usize,
        param: Tensor<1>,
        grad: Tensor<1>,
        scale: f32,
        lr: f64,
        decay: bool,
    ) -> Tensor<1> {
        let n = param.dims()[0];
        assert_eq!(grad.dims()[0], n, "parameter {i}: gradient size");
        if self.state.len() <= i {
            self.state.resize_with(i + 1, Default::default);
        }
        let device = param.device();
        let state = &mut self.state[i];
        let (m, v) = match state.device.take() {
            Some(mv) => mv,
            None if state.m.is_empty() => {
                (Tensor::zeros([n], &device), Tensor::zeros([n], &device))
            }
            None => {
                let upload = |x: Vec<f32>| Tensor::from_data(TensorData::new(x, [n]), &device);
                (
                    upload(std::mem::take(&mut state.m)),
                    upload(std::mem::take(&mut state.v)),
                )
            }
        };
        assert_eq!(m.dims()[0], n, "parameter {i}: size changed");
        state.step += 1;
        let k = self.config.step(state.step, scale, lr, decay);
        let g = grad * k.scale;
        let p = if k.shrink == 1.0 {
            param
        } else {
            param * k.shrink
        };
        let m = m.clone() + (g.clone() - m) * k.w1;
        let v = v * k.b2 + g.clone() * g * k.w2;
        let denom = v.clone().sqrt() / k.bc2_sqrt + k.eps;
        let p = p - (m.clone() / denom) * k.step_size;
        state.device = Some((m, v));
        p
    }
}

impl AdamWConfig {
    /// The coefficients of update number `step` (1-based) of one parameter.
    fn step(&self, step: u64, scale: f32, lr: f64, decay: bool) -> Step {
        let t = step.min(i32::MAX as u64) as i32;
        let shrink = (1.0 - lr * self.weight_decay) as f32;
        Step {
            scale,
            // Multiplying by 1 changes nothing: one loop, without a branch in it.
            shrink: if decay { shrink } else { 1.0 },
            w1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            eps: self.eps as f32,
            step_size: (lr / (1.0 - self.beta1.powi(t))) as f32,
        }
    }
}

/// One update's coefficients, in f32.
struct Step {
    scale: f32,
    shrink: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// The update of one stretch of a parameter, on the widest vector instructions the CPU has
/// (the same arithmetic at every width: no fused multiply-adds).
fn fused(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], k: &Step) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::Isa::selected() >= crate::cpu::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 (checked at run time just above).
        unsafe { fused_avx2(param, grad, m, v, k) };
        return;
    }
    fused_loop(param, grad, m, v, k);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fused_avx2(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], k: &Step) {
    fused_loop(param, grad, m, v, k);
}

#[inline(always)]
fn fused_loop(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], k: &Step) {
    for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m).zip(v) {
        let g = g * k.scale;
        *p *= k.shrink;
        *m += k.w1 * (g - *m);
        *v = *v * k.b2 + k.w2 * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p += -k.step_size * (*m / denom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 loop computes the same bits as the portable one (no fused multiply-adds).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_update_equals_the_portable_loop() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let n = 1000;
        let wave = |k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
        let k = Step {
            scale: 0.7,
            shrink: 0.999,
            w1: 0.1,
            b2: 0.999,
            w2: 0.001,
            bc2_sqrt: 0.05,
            eps: 1e-8,
            step_size: 1e-3,
        };
        let (mut p1, g, mut m1, mut v1) = (wave(0.1), wave(0.37), wave(0.05), wave(0.02));
        v1.iter_mut().for_each(|v| *v = v.abs());
        let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
        fused_loop(&mut p1, &g, &mut m1, &mut v1, &k);
        // SAFETY: AVX2 was detected above.
        unsafe { fused_avx2(&mut p2, &g, &mut m2, &mut v2, &k) };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            (bits(&p1), bits(&m1), bits(&v1)),
            (bits(&p2), bits(&m2), bits(&v2))
        );
    }

    /// Reserved moments change nothing: the same updates bit for bit, a parameter's existing
    /// moments kept, and a reserved parameter never updated still counts no step.
    #[test]
    fn reserved_moments_change_no_update() {
        let wave = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<f32>>();
        let sizes = [300, 7, 50];
        let (mut lazy, mut reserved) = (AdamW::default(), AdamW::default());
        let mut p_lazy: Vec<Vec<f32>> = sizes.iter().map(|&n| wave(n, 0.3)).collect();
        let mut p_res = p_lazy.clone();
        // Parameter 0 has moments before the reservation; parameter 2 is never updated.
        lazy.update(0, &mut p_lazy[0], &wave(300, 0.1), 1.0, 1e-3, true);
        reserved.update(0, &mut p_res[0], &wave(300, 0.1), 1.0, 1e-3, true);
        reserved.reserve(&sizes);
        assert_eq!(reserved.state[0].m, lazy.state[0].m);
        assert_eq!(reserved.state[0].step, 1);
        assert_eq!((reserved.state[2].m.len(), reserved.state[2].step), (50, 0));
        for round in 0..3 {
            for (i, &n) in sizes[..2].iter().enumerate() {
                let g = wave(n, 0.2 + round as f32);
                lazy.update(i, &mut p_lazy[i], &g, 0.8, 1e-3, i == 0);
                reserved.update(i, &mut p_res[i], &g, 0.8, 1e-3, i == 0);
            }
        }
        assert_eq!(p_lazy, p_res);
        for i in 0..2 {
            assert_eq!(lazy.state[i].host(), reserved.state[i].host());
            assert_eq!(lazy.state[i].step, reserved.state[i].step);
        }
        assert_eq!(reserved.state[2].step, 0);
    }

    #[test]
    fn schedule_is_trainers() {
        // transformers' lr_lambda(s) for warm-up 2, total 5, at s = 0..6.
        let s = LinearSchedule {
            warmup: 2,
            total: 5,
        };
        let got: Vec<f64> = (1..=7).map(|t| s.factor(t)).collect();
        assert_eq!(got, [0.0, 0.5, 1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0]);
        let none = LinearSchedule {
            warmup: 0,
            total: 4,
        };
        assert_eq!(none.factor(1), 1.0);
    }

    #[test]
    fn decay_skips_biases_and_norms() {
        assert!(decays("encoder.block.0.layer.0.SelfAttention.q.weight"));
        assert!(decays("shared.weight"));
        for n in [
            "encoder.block.0.layer.0.layer_norm.weight",
            "encoder.final_layer_norm.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder.block.1.layer.2.mlp.router.classifier.bias",
        ] {
            assert!(!decays(n), "{n}");
        }
    }

    /// The tensor-op update (what GPU backends run) gives the fused host loop's values, over
    /// three updates with clipping and decay, across a move of the moments to the host and
    /// back (a checkpoint); run here on the CPU backend's tensors.
    #[test]
    fn tensor_update_equals_the_host_loop() {
        let device = burn::tensor::Device::default();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (mut host, mut dev) = (AdamW::new(config), AdamW::new(config));
        let n = 1000;
        let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut t = Tensor::<1>::from_data(TensorData::new(p.clone(), [n]), &device);
        for step in 0..3 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * (step + 3)) as f32 * 0.11).cos())
                .collect();
            let gt = Tensor::<1>::from_data(TensorData::new(g.clone(), [n]), &device);
            host.update(0, &mut p, &g, 0.5, 1e-2, true);
            t = dev.update_tensor(0, t, gt, 0.5, 1e-2, true);
            assert!(dev.state[0].device.is_some() && dev.state[0].m.is_empty());
            if step == 1 {
                // As a checkpoint and its restore leave them: on the host.
                let (m, v) = dev.state[0].host();
                (dev.state[0].m, dev.state[0].v, dev.state[0].device) = (m, v, None);
            }
        }
        let got = host_f32(t);
        let worst = got
            .iter()
            .zip(&p)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "tensor update differs by {worst}");
        let ((hm, hv), (dm, dv)) = (host.state[0].host(), dev.state[0].host());
        assert!(
            hm.iter()
                .zip(&dm)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0))
        );
        assert!(
            hv.iter()
                .zip(&dv)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1e-3))
        );
        assert_eq!(dev.state[0].step, 3);
    }

    /// One parameter by hand: after the first update with no decay, every element moves by
    /// `lr` against its gradient's sign (m / sqrt(v) = sign(g) after bias correction).
    #[test]
    fn first_update_moves_by_lr() {
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut p = vec![1.0f32, -2.0, 0.5];
        opt.update(0, &mut p, &[0.3, -4.0, 1e-3], 1.0, 0.01, true);
        for (got, want) in p.iter().zip([0.99f32, -1.99, 0.49]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Decoupled decay: a zero gradient still shrinks the weight by lr * wd.
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        });
        let mut p = vec![2.0f32];
        opt.update(0, &mut p, &[0.0], 1.0, 0.5, true);
        assert!((p[0] - 2.0 * 0.95).abs() < 1e-6, "{}", p[0]);
    }
}
