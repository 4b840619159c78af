//! One copy of the model with its optimizer state, on its device: what a data-parallel
//! replica, a rank, or a run without parallelism trains. [`super::replicas`] holds several.

use anyhow::Result;
use burn::tensor::Device;

use crate::interop::weights::{Source, model_from_state_dict, model_state_dict};
use crate::model::{ModelConfig, SwitchTransformer};
use crate::optim::{LabmlAdam, ParamGrads};

/// One copy of the model with its optimizer state, on its device.
pub struct Replica {
    /// This copy of the model.
    pub model: SwitchTransformer,
    /// Its optimizer state.
    pub adam: LabmlAdam,
    /// An autodiff device.
    pub device: Device,
}

impl Replica {
    /// One Adam step on this replica's weights with `grad_scale * g`. The model is handed to
    /// the step, not a clone of it, so that on the CPU weights no other tensor shares are
    /// updated in their own storage (`cpu::adam`; a clone kept here made every step copy every
    /// parameter).
    pub(super) fn adam_step(self, g: &ParamGrads, lr: f64, grad_scale: f64) -> Self {
        let Replica {
            model,
            mut adam,
            device,
        } = self;
        let model = adam.step_scaled(model, g, lr, grad_scale);
        Replica {
            model,
            adam,
            device,
        }
    }

    /// A copy of `self` on `device`, with tensors of its own: the weights, and the optimizer
    /// moments if `with_moments` (only replicas that take their own Adam steps need them).
    pub(super) fn copy_to(
        &self,
        config: &ModelConfig,
        device: &Device,
        with_moments: bool,
    ) -> Result<Self> {
        let device = device.clone().autodiff();
        let weights = model_state_dict(&self.model, Source::Values);
        let model = model_from_state_dict(config, &weights, &device)?;
        let mut adam = LabmlAdam::new(self.adam.beta1, self.adam.beta2, self.adam.eps);
        if with_moments {
            adam.load_state_tensors(
                self.adam.step,
                &self.adam.state_tensors().into_iter().collect(),
            )?;
        }
        Ok(Self {
            model,
            adam,
            device,
        })
    }
}
