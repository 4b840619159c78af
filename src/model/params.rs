//! The one walk over a model's trainable parameters (those that require a gradient), in module
//! order: what Adam, the data-parallel replicas, expert sharding and the checksums between
//! ranks all iterate over.
//!
//! ```text
//! trainable(m)            path, id and shape of each, in module order
//! values(m, keep)         their values, flattened (no autodiff graph)
//! map(m, select, f)       each selected parameter replaced by f(its flat value), as a fresh leaf
//! ```
//! A parameter's path (`layers.0.attn.query.weight`) is stable across runs and processes (the
//! key of its Adam moments in checkpoints); its id is stable within a process (the key of its
//! gradient). The one other walk is [`crate::optim::ParamGrads::from_gradients`], which needs
//! the autodiff tensor itself to take its gradient out of Burn's gradients.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// A trainable parameter: where it is in the module and its shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParamInfo {
    /// Module path, `.`-joined (`layers.0.attn.query.weight`).
    pub path: String,
    /// Id of the parameter (of this process's copy of the module).
    pub id: ParamId,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl ParamInfo {
    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Module paths as the walk enters and leaves sub-modules.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn info<const D: usize>(&self, param: &Param<Tensor<D>>) -> ParamInfo {
        ParamInfo {
            path: self.0.join("."),
            id: param.id,
            shape: param.shape().dims::<D>().to_vec(),
        }
    }
}

/// `f(info, param)` for every trainable parameter of `module`, in module order.
fn visit<M: Module>(module: &M, f: &mut dyn FnMut(ParamInfo, &dyn Fn() -> Tensor<1>)) {
    struct Walk<'a> {
        path: Path,
        f: &'a mut dyn FnMut(ParamInfo, &dyn Fn() -> Tensor<1>),
    }
    impl ModuleVisitor for Walk<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                let info = self.path.info(param);
                let n = info.len();
                (self.f)(info, &|| param.val().inner().reshape([n]));
            }
        }
    }
    module.visit(&mut Walk {
        path: Path::default(),
        f,
    });
}

/// Every trainable parameter of `module`, in module order.
pub(crate) fn trainable<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut out = vec![];
    visit(module, &mut |info, _| out.push(info));
    out
}

/// The values of the trainable parameters for which `keep` holds, flattened, without their
/// autodiff graph (shared with the parameter, not copied), in module order.
pub(crate) fn values<M: Module>(
    module: &M,
    mut keep: impl FnMut(&ParamInfo) -> bool,
) -> Vec<(ParamInfo, Tensor<1>)> {
    let mut out = vec![];
    visit(module, &mut |info, value| {
        if keep(&info) {
            out.push((info, value()));
        }
    });
    out
}

/// `module` with each trainable parameter for which `select` holds replaced by `f(info,
/// value)`: `value` is the parameter's flat value without its graph, handed over (not cloned,
/// so that an in-place update can own its storage); the result, on the same device, keeps the
/// inner dimensions (its first one follows from its length) and becomes a fresh leaf that
/// requires a gradient (an autodiff tensor if the parameter was one). The others are kept.
pub(crate) fn map<M: Module>(
    module: M,
    mut select: impl FnMut(&ParamInfo) -> bool,
    mut f: impl FnMut(&ParamInfo, Tensor<1>) -> Tensor<1>,
) -> M {
    struct Map<'a> {
        path: Path,
        select: &'a mut dyn FnMut(&ParamInfo) -> bool,
        f: &'a mut dyn FnMut(&ParamInfo, Tensor<1>) -> Tensor<1>,
    }
    impl ModuleMapper for Map<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.0.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !param.is_require_grad() {
                return param;
            }
            let info = self.path.info(&param);
            if !(self.select)(&info) {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let autodiff = tensor.is_autodiff();
            let value = (self.f)(&info, tensor.inner().reshape([info.len()]));
            let mut dims = [0; D];
            dims.copy_from_slice(&info.shape);
            let inner: usize = dims[1..].iter().product();
            dims[0] = value.dims()[0] / inner.max(1);
            let value = value.reshape(dims);
            let value = if autodiff { value.autodiff() } else { value };
            Param::from_mapped_value(id, value.require_grad(), mapper)
        }
    }
    module.map(&mut Map {
        path: Path::default(),
        select: &mut select,
        f: &mut f,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SwitchFeedForward, SwitchFeedForwardConfig};
    use burn::tensor::{Device, TensorData};

    fn layer() -> SwitchFeedForward {
        SwitchFeedForwardConfig::new(8, 16, 4).init(&Device::default().autodiff())
    }

    #[test]
    fn trainable_lists_every_parameter_once_with_its_path_in_module_order() {
        let m = layer();
        let params = trainable(&m);
        let paths: Vec<&str> = params.iter().map(|p| p.path.as_str()).collect();
        let unique: std::collections::HashSet<_> = paths.iter().collect();
        assert_eq!(unique.len(), paths.len(), "{paths:?}");
        let w1 = params.iter().find(|p| p.id == m.experts.w1.id).unwrap();
        assert_eq!(w1.path, "experts.w1", "{paths:?}");
        assert_eq!(w1.shape, m.experts.w1.dims().to_vec());
        // Router (weight, bias) and experts (w1, b1, w2, b2): 8*4 + 4 + 4*(8*16 + 16 + 16*8 + 8).
        let total: usize = params.iter().map(ParamInfo::len).sum();
        assert_eq!(
            total,
            8 * 4 + 4 + 4 * (8 * 16 + 16 + 16 * 8 + 8),
            "{paths:?}"
        );
        // Values come in the same order with the same lengths, without a graph.
        let values = values(&m, |_| true);
        assert_eq!(values.len(), params.len());
        for ((info, v), p) in values.iter().zip(&params) {
            assert_eq!(info, p);
            assert_eq!(v.dims(), [p.len()]);
            assert!(!v.is_autodiff());
        }
    }

    #[test]
    fn map_replaces_the_selected_parameters_as_fresh_leaves_and_keeps_the_rest() {
        let m = layer();
        let (w1, b2) = (m.experts.w1.id, m.experts.b2.id);
        let w1_dims = m.experts.w1.dims();
        let b2_before = values(&m, |p| p.id == b2)[0].1.clone().into_data();
        // w1 halved along its first dimension (as expert sharding keeps a share); b2 kept.
        let m = map(
            m,
            |p| p.id == w1,
            |p, v| {
                let n = p.len() / 2;
                Tensor::from_data(TensorData::new(vec![1.5f32; n], [n]), &v.device())
            },
        );
        assert_eq!(m.experts.w1.id, w1);
        assert!(m.experts.w1.is_require_grad() && m.experts.w1.val().is_autodiff());
        assert_eq!(
            m.experts.w1.dims(),
            [w1_dims[0] / 2, w1_dims[1], w1_dims[2]]
        );
        let got = values(&m, |p| p.id == w1)[0].1.clone().into_data();
        assert!(got.try_into_vec::<f32>().unwrap().iter().all(|&x| x == 1.5));
        assert_eq!(
            values(&m, |p| p.id == b2)[0].1.clone().into_data(),
            b2_before
        );
    }
}
