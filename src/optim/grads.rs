//! Gradients of a module's parameters, flattened, in module order (so that reductions over
//! them, like the global norm, add up in the same order every run), and PyTorch's global-norm
//! clip (`clip_grad_norm_`: one norm over all gradients, not one per tensor).

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor};

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

    /// Sets the gradient of parameter `id` (keeping its place if it had one).
    pub(crate) fn insert(&mut self, id: ParamId, grad: Tensor<1>) {
        match self.index.get(&id) {
            Some(&i) => self.grads[i] = grad,
            None => {
                self.index.insert(id, self.grads.len());
                self.grads.push(grad);
            }
        }
    }

    /// Replaces every gradient by `f(gradient)`.
    pub(crate) fn map(&mut self, mut f: impl FnMut(Tensor<1>) -> Tensor<1>) {
        for g in &mut self.grads {
            *g = f(g.clone());
        }
    }

    /// The gradients with their parameters' ids, in module order.
    pub(crate) fn into_parts(self) -> Vec<(ParamId, Tensor<1>)> {
        let mut ids: Vec<(usize, ParamId)> =
            self.index.into_iter().map(|(id, i)| (i, id)).collect();
        ids.sort_by_key(|&(i, _)| i);
        ids.into_iter().map(|(_, id)| id).zip(self.grads).collect()
    }

    /// The gradient of parameter `id`.
    pub(crate) fn get(&self, id: &ParamId) -> Option<&Tensor<1>> {
        self.index.get(id).map(|&i| &self.grads[i])
    }

    /// L2 norm over all gradients together (one read back to the host; on the CPU backend a
    /// pass over the gradients' storage, accumulated in f64).
    pub(crate) fn global_norm(&self) -> f64 {
        match self.sum_of_squares() {
            SumOfSquares::Host(total) => total.sqrt(),
            SumOfSquares::Device(t) => (crate::store::host_f32(t)[0] as f64).sqrt(),
        }
    }

    /// The sum of the squares of all gradients: computed on the host where the gradients are
    /// host memory (the CPU backend), else a `[1]` tensor on their device, for the caller to
    /// read with other values in one synchronisation.
    pub(crate) fn sum_of_squares(&self) -> SumOfSquares {
        if let Some(total) = crate::cpu::adam::sum_of_squares(&self.grads) {
            return SumOfSquares::Host(total);
        }
        match tensor_sum_of_squares(&self.grads) {
            Some(t) => SumOfSquares::Device(t),
            None => SumOfSquares::Host(0.0),
        }
    }
}

/// The sum of the squares of `grads` as a `[1]` tensor on their device (`None` without
/// gradients), in few kernels, for the caller to read with other values in one
/// synchronisation.
pub(crate) fn tensor_sum_of_squares(grads: &[Tensor<1>]) -> Option<Tensor<1>> {
    // On a GPU: gradients concatenated in groups ([`norm_groups`]: under Burn's fusion a
    // concatenation of up to 16 tensors is one kernel), each group's dot product g . g as
    // one [1, n] x [n, 1] matmul (square-then-reduce would be two kernels), the [1] results
    // summed by element-wise adds, which fuse. Measured on lavapipe at the reference
    // configuration: the optimizer phase 485 launches with a square and a reduction per
    // gradient, 236 with a matmul per gradient, 129 with groups. All products first, then
    // the additions, so that they follow one another in the queue and fuse.
    let dots: Vec<Tensor<1>> = norm_groups(grads.iter().map(|g| g.dims()[0]))
        .into_iter()
        .map(|group| {
            // In f32 whatever the gradients' precision (an f16 sum would overflow).
            let f32 =
                |i: usize| crate::model::ops::cast_to(grads[i].clone(), burn::tensor::DType::F32);
            let g = match group.len() {
                1 => f32(group.start),
                _ => Tensor::cat(group.map(f32).collect(), 0),
            };
            let n = g.dims()[0];
            g.clone()
                .reshape([1, n])
                .matmul(g.reshape([n, 1]))
                .reshape([1])
        })
        .collect();
    dots.into_iter().reduce(|a, b| a + b)
}

/// Consecutive gradients, by index, grouped for [`ParamGrads::sum_of_squares`] on a GPU: at
/// most [`NORM_GROUP_TENSORS`] per group (what one fused concatenation kernel binds, within
/// every backend's limit) and at most [`NORM_GROUP_ELEMENTS`] elements (the concatenation is a
/// temporary copy), a larger gradient alone.
pub(crate) fn norm_groups(sizes: impl IntoIterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let mut elements = 0;
    for (i, n) in sizes.into_iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.len() < NORM_GROUP_TENSORS && elements + n <= NORM_GROUP_ELEMENTS => {
                g.end = i + 1;
                elements += n;
            }
            _ => {
                groups.push(i..i + 1);
                elements = n;
            }
        }
    }
    groups
}

/// Most gradients concatenated into one for the norm ([`norm_groups`]).
pub(crate) const NORM_GROUP_TENSORS: usize = 16;
/// Most elements in one concatenation for the norm (16 MiB of f32).
pub(crate) const NORM_GROUP_ELEMENTS: usize = 1 << 22;

/// `ParamGrads::sum_of_squares`: a value, or a tensor not read yet.
#[allow(clippy::large_enum_variant)] // one per step
pub(crate) enum SumOfSquares {
    /// Computed on the host.
    Host(f64),
    /// A `[1]` tensor on the gradients' device.
    Device(Tensor<1>),
}

/// PyTorch `clip_grad_norm_`'s factor for gradients of global norm `norm`:
/// `min(1, max_norm / (norm + 1e-6))`.
///
/// ```
/// use switch_transformer::optim::clip_coefficient;
/// assert_eq!(clip_coefficient(0.5, 1.0), 1.0); // under the limit: unchanged
/// assert!((clip_coefficient(4.0, 1.0) - 0.25).abs() < 1e-6); // scaled down to norm 1
/// ```
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn norm_groups_cover_every_gradient_once_within_both_limits() {
        // Consecutive and complete: each index in exactly one group, in order.
        let sizes: Vec<usize> = (0..40).map(|i| 1 + i * 1000).collect();
        let groups = norm_groups(sizes.iter().copied());
        let flat: Vec<usize> = groups.iter().cloned().flatten().collect();
        assert_eq!(flat, (0..40).collect::<Vec<_>>());
        for g in &groups {
            assert!(!g.is_empty() && g.len() <= NORM_GROUP_TENSORS, "{g:?}");
            let n: usize = sizes[g.clone()].iter().sum();
            assert!(g.len() == 1 || n <= NORM_GROUP_ELEMENTS, "{g:?}: {n}");
        }
        // Small gradients: full groups of 16, the rest last.
        assert_eq!(norm_groups([1; 40]), vec![0..16, 16..32, 32..40]);
        // A gradient over the element limit stands alone, and closes the group before it.
        let big = NORM_GROUP_ELEMENTS + 1;
        assert_eq!(norm_groups([1, 2, big, 3]), vec![0..2, 2..3, 3..4]);
        // Exactly at the limit still fits.
        assert_eq!(
            norm_groups([NORM_GROUP_ELEMENTS - 1, 1, 1]),
            vec![0..2, 2..3]
        );
        assert!(norm_groups(std::iter::empty()).is_empty());
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
}
