//! Fine-tuning the released Switch checkpoints as transformers' `Trainer` does: the loss of
//! `SwitchTransformersForConditionalGeneration` with its router losses ([`loss`]), PyTorch's
//! AdamW under `Trainer`'s linear schedule ([`crate::optim::adamw`]) after global-norm
//! clipping, in f32. One update:
//!
//! ```text
//! for each of the accum micro-batches:                      (dropout, router jitter on)
//!     loss = CE + z_coef * z + aux_coef * aux               ([`loss`])
//!     grads += d(loss / accum) / d(params)
//! grads *= min(1, max_grad_norm / (|grads| + 1e-6))         (one norm over every gradient)
//! params = AdamW(params, grads, lr * schedule(update))      (parameters without a gradient,
//!                                                            like an expert no token reached,
//!                                                            skipped as PyTorch skips them)
//! ```
//! With `precision = "bf16"` the passes compute in bf16 on bf16 copies of the weights, made
//! where each is used; the weights themselves stay f32 (the master copies AdamW updates, so
//! that updates far below bf16's spacing, 2^-7 relative, still accumulate); the router,
//! the norms' mean squares, the attention softmax and the losses stay f32.
//!
//! | file | what |
//! |---|---|
//! | [`data`] | JSON lines of `{"input", "target"}`, tokenised, cut, padded, shifted right |
//! | [`loss`] | cross-entropy, router z-loss, load-balancing loss, as transformers reduces them |
//! | [`parallel`] | an update's micro-batches split over threads and MPI ranks |
//! | [`parity`] | fixtures recorded with transformers' training replayed |
//! | [`rouge`] | ROUGE-1/2/L as `rouge-score` computes them |
//! | [`config`] | every setting (`--set`), the run's `config.toml` |
//! | [`resume`] | what a checkpoint holds to continue exactly: AdamW's state, generators, data order |
//! | [`run`] | `switch finetune`: the run folder, the loop, checkpoints, saving |
//! | [`validate`] | validation loss, greedy generations and their ROUGE |

pub mod config;
pub mod data;
pub mod loss;
pub mod parallel;
pub mod parity;
pub mod resume;
pub mod rouge;
pub mod run;
pub mod validate;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::{RngCore, SeedableRng};

use self::data::Batch;
use self::loss::Seq2SeqLoss;
use self::parallel::Workers;
use crate::hf::model::HfSwitchTransformer;
use crate::hf::sparse::Grouping;
use crate::hf::training::{ParamMut, Training};
use crate::model::precision::Precision;
use crate::optim::adamw::decays;
use crate::optim::{AdamW, AdamWConfig, LinearSchedule, clip_coefficient};
use crate::routing::RoutingRng;
use crate::store::{HostTensor, host_f32};

/// The optimisation settings of one fine-tuning run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimisation {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW's settings.
    pub adamw: AdamWConfig,
    /// Warm-up and total updates.
    pub schedule: LinearSchedule,
    /// Global gradient-norm limit (0: no clipping).
    pub max_grad_norm: f64,
    /// Dropout probability in training.
    pub dropout: f64,
    /// Router jitter in training.
    pub jitter: f64,
    /// The activations' type: f32, or bf16 (the forward and backward on bf16 copies of the
    /// weights, cast from the f32 weights where used; AdamW updates the f32 weights, the
    /// master copies; the router, norms' statistics, softmaxes and losses stay f32).
    pub precision: Precision,
}

/// What one update measured (loss parts averaged over its micro-batches).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateStats {
    /// The loss minimised.
    pub loss: f64,
    /// Cross-entropy.
    pub cross_entropy: f64,
    /// Router z-loss, encoder and decoder.
    pub z: [f64; 2],
    /// Load-balancing loss, encoder and decoder.
    pub aux: [f64; 2],
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Target tokens that counted.
    pub tokens: usize,
    /// Fraction of routed tokens dropped by capacity, over every sparse layer.
    pub dropped: f64,
    /// Each sparse layer's load, averaged over the micro-batches.
    pub layers: Vec<LayerLoad>,
    /// The gradient norm was not finite: the model and the optimizer were left unchanged.
    pub skipped: bool,
}

impl UpdateStats {
    /// Adds `other`'s loss parts, tokens and loads (each already divided by the update's
    /// micro-batches).
    pub(crate) fn add(&mut self, other: &UpdateStats) {
        self.loss += other.loss;
        self.cross_entropy += other.cross_entropy;
        for i in 0..2 {
            self.z[i] += other.z[i];
            self.aux[i] += other.aux[i];
        }
        self.dropped += other.dropped;
        self.tokens += other.tokens;
        if self.layers.is_empty() {
            self.layers = other.layers.clone();
        } else {
            for (a, b) in self.layers.iter_mut().zip(&other.layers) {
                a.dropped += b.dropped;
                for (x, y) in a.expert_frac.iter_mut().zip(&b.expert_frac) {
                    *x += y;
                }
            }
        }
    }
}

/// One parameter's gradient.
pub struct ParamGrad {
    /// Its transformers name.
    pub name: String,
    /// Flattened, in the layout the model stores it, on the model's device (`None`: no
    /// gradient reached it).
    pub grad: Option<Tensor<1>>,
    /// `[in, out]` of a linear weight, which the model stores transposed from transformers'
    /// `[out, in]`.
    pub linear: Option<[usize; 2]>,
    /// Elements of the parameter.
    pub len: usize,
}

impl ParamGrad {
    /// The gradient in transformers' layout, on the host.
    pub fn pytorch_layout(&self) -> Option<Vec<f32>> {
        let g = host_f32(self.grad.clone()?);
        Some(match self.linear {
            Some([rows, cols]) => HostTensor::f32(vec![rows, cols], g).transposed().to_f32(),
            None => g,
        })
    }
}

/// The gradients of one or more micro-batches, per parameter in walk order, with the measured
/// loss parts.
pub struct Gradients {
    /// Per parameter.
    pub grads: Vec<ParamGrad>,
    /// Loss parts, averaged over the micro-batches.
    pub stats: UpdateStats,
}

impl Gradients {
    /// Adds `other`'s gradients (parameter by parameter; one without a gradient adds
    /// nothing) and statistics.
    pub(crate) fn add(&mut self, other: Gradients) {
        for (a, b) in self.grads.iter_mut().zip(other.grads) {
            a.grad = match (a.grad.take(), b.grad) {
                (Some(x), Some(y)) => Some(x + y),
                (x, y) => x.or(y),
            };
        }
        self.stats.add(&other.stats);
    }
}

/// A model being fine-tuned, its optimizer and its generator.
pub struct Finetuner {
    /// The model, on an autodiff device, every parameter f32 and tracked.
    pub model: HfSwitchTransformer,
    /// The optimizer's state.
    pub adamw: AdamW,
    /// Settings.
    pub opt: Optimisation,
    /// Updates done.
    pub updates: u64,
    /// Draws the seeds of each micro-batch's dropout masks and jitter.
    pub rng: RoutingRng,
    /// The replicas and ranks that split each update's micro-batches.
    pub workers: Workers,
    inner: Device,
}

/// How one sparse layer routed the tokens of an update (padding included, as transformers
/// routes it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerLoad {
    /// `encoder.block.1`, `decoder.block.3`, ...
    pub name: String,
    /// Fraction of the tokens whose chosen expert is each expert (before dropping).
    pub expert_frac: Vec<f64>,
    /// Fraction of the tokens dropped (over their expert's capacity).
    pub dropped: f64,
}

/// The loss of `batch` on `m`, the fraction of routed tokens dropped, and each sparse layer's
/// load, in a training pass when `train` is given (else as in eval, with the router losses 0).
pub fn batch_loss(
    m: &HfSwitchTransformer,
    batch: &Batch,
    mut train: Option<&mut Training>,
) -> Result<(Seq2SeqLoss, f64, Vec<LayerLoad>)> {
    let enc = m.encode_pass(
        &batch.input_ids,
        &batch.mask,
        batch.b,
        batch.src,
        train.as_deref_mut(),
    )?;
    let n_enc = train.as_ref().map_or(0, |t| t.router_logits.len());
    let (logits, dec_routes) = m.decode_pass(
        &batch.decoder_input_ids,
        batch.b,
        batch.tgt,
        &enc,
        None,
        Grouping::PerSequence,
        train.as_deref_mut(),
    )?;
    let (routed, dropped) =
        enc.routes
            .iter()
            .chain(&dec_routes)
            .fold((0usize, 0usize), |(r, d), x| {
                (
                    r + x.plan.routes.len(),
                    d + x.plan.dropped.iter().filter(|&&d| d).count(),
                )
            });
    let dropped = if routed == 0 {
        0.0
    } else {
        dropped as f64 / routed as f64
    };
    let c = &m.config;
    let names = (0..c.num_layers)
        .filter(|&i| c.is_sparse(false, i))
        .map(|i| format!("encoder.block.{i}"))
        .chain(
            (0..c.decoder_layers())
                .filter(|&i| c.is_sparse(true, i))
                .map(|i| format!("decoder.block.{i}")),
        );
    let layers = enc
        .routes
        .iter()
        .chain(&dec_routes)
        .zip(names)
        .map(|(r, name)| {
            let n = r.plan.routes.len().max(1) as f64;
            LayerLoad {
                name,
                expert_frac: r.plan.counts.iter().map(|&k| k as f64 / n).collect(),
                dropped: r.plan.dropped.iter().filter(|&&d| d).count() as f64 / n,
            }
        })
        .collect();
    let empty = Vec::new();
    let (enc_router, dec_router) = match &train {
        Some(t) => t.router_logits.split_at(n_enc),
        None => (&empty[..], &empty[..]),
    };
    let logits = crate::model::precision::f32(logits);
    let loss = Seq2SeqLoss::new(&m.config, logits, &batch.labels, enc_router, dec_router)?;
    Ok((loss, dropped, layers))
}

/// Refuses a compute type fine-tuning does not train in (f16).
pub(crate) fn check_precision(precision: Precision) -> Result<()> {
    if precision == Precision::F16 {
        bail!(
            "precision must be f32 or bf16: f16 would need loss scaling (its range underflows \
             small gradients), which finetune does not do"
        );
    }
    Ok(())
}

impl Finetuner {
    /// Takes `model` (on `device`, any dtype) to train it on `device`: f32 weights, the
    /// activations in `opt.precision` (f32 or bf16).
    pub fn new(
        mut model: HfSwitchTransformer,
        device: &Device,
        opt: Optimisation,
        seed: u64,
    ) -> Result<Self> {
        check_precision(opt.precision)?;
        crate::model::precision::check_device(opt.precision, device)?;
        let ad = device.clone().autodiff();
        model.to_device_f32(&ad)?;
        model.set_compute(opt.precision.dtype().into());
        model.visit_params(&mut |_, p| {
            match p {
                ParamMut::Vector(t) => *t = t.clone().require_grad(),
                ParamMut::Matrix { tensor, .. } => *tensor = tensor.clone().require_grad(),
            }
            Ok(())
        })?;
        Ok(Self {
            model,
            adamw: AdamW::new(opt.adamw),
            opt,
            updates: 0,
            rng: RoutingRng::seed_from_u64(seed),
            workers: Workers::new(1, None, device)?,
            inner: device.clone(),
        })
    }

    /// The gradients of the mean loss over `batches` (all the micro-batches of one update,
    /// of which this process computes its share: [`parallel`]), summed over the workers.
    pub fn gradients(&mut self, batches: &[Batch]) -> Result<Gradients> {
        if batches.is_empty() {
            bail!("an update needs at least one batch");
        }
        let n = batches.len();
        let seeds: Vec<u64> = (0..n).map(|_| self.rng.next_u64()).collect();
        let mine = self.workers.share(n)?;
        let per = mine.len() / self.workers.replicas;
        let (opt, first) = (self.opt, mine.start);
        let mut parts = self.workers.on_replicas(&mut self.model, |m, k| {
            let r = first + k * per..first + (k + 1) * per;
            micro_gradients(m, &batches[r.clone()], &seeds[r], n, &opt)
        })?;
        let mut sum = parts.remove(0);
        for p in parts {
            sum.add(p);
        }
        if let Some(world) = &self.workers.world {
            sum.all_reduce(world.as_ref(), &self.inner)?;
        }
        Ok(sum)
    }

    /// One update on `batches` (its micro-batches); with a non-finite gradient norm, none
    /// (`skipped`: the model and the optimizer unchanged, the update counted).
    pub fn update(&mut self, batches: &[Batch]) -> Result<UpdateStats> {
        // Host moments before the first gradients exist (see `AdamW::reserve`).
        if self.updates == 0 && crate::device::Paths::of(&self.inner).host_kernels {
            let (_, sizes) = self.param_names_and_sizes()?;
            self.adamw.reserve(&sizes);
        }
        let Gradients { grads, mut stats } = self.gradients(batches)?;
        let present: Vec<Tensor<1>> = grads.iter().filter_map(|g| g.grad.clone()).collect();
        // On the host where the gradients are host memory, else on their device in few
        // kernels and one read.
        let norm = crate::cpu::adam::sum_of_squares(&present)
            .unwrap_or_else(|| {
                crate::optim::tensor_sum_of_squares(&present)
                    .map_or(0.0, |t| f64::from(t.into_scalar::<f32>()))
            })
            .sqrt();
        drop(present);
        stats.grad_norm = norm;
        if !norm.is_finite() {
            // Nothing changes but the count: the schedule and the data move on.
            self.updates += 1;
            stats.skipped = true;
            return Ok(stats);
        }
        let clip = if self.opt.max_grad_norm > 0.0 {
            clip_coefficient(norm, self.opt.max_grad_norm) as f32
        } else {
            1.0
        };
        self.updates += 1;
        let lr = self.opt.learning_rate * self.opt.schedule.factor(self.updates);
        stats.lr = lr;
        let ad = self.inner.clone().autodiff();
        let adamw = &mut self.adamw;
        let mut grads = grads.into_iter();
        let mut i = 0;
        // The tied embedding's other holders let go of it, so that it is updated in place too
        // (the walk ties them again at its end).
        self.model.untie();
        // AdamW is elementwise: parameters, gradients and moments all in the model's layout.
        self.model.visit_params(&mut |name, p| {
            let g = grads.next().expect("one gradient per parameter");
            debug_assert_eq!(g.name, name);
            if let Some(g) = g.grad {
                let decay = decays(name);
                let mut step = |theta: Tensor<1>, g: Tensor<1>| {
                    if crate::cpu::adam::applies(&theta, &g) {
                        host_step(theta, &g, &mut |p, g| {
                            adamw.update(i, p, g, clip, lr, decay)
                        })
                    } else {
                        adamw.update_tensor(i, theta, g, clip, lr, decay)
                    }
                };
                match p {
                    ParamMut::Vector(t) => updated(t, g, &mut step, &ad),
                    ParamMut::Matrix { tensor, .. } => updated(tensor, g, &mut step, &ad),
                }
            }
            i += 1;
            Ok(())
        })?;
        Ok(stats)
    }

    /// Every parameter's name and element count, in the walk's order (AdamW's indices).
    pub fn param_names_and_sizes(&self) -> Result<(Vec<String>, Vec<usize>)> {
        let (mut names, mut sizes) = (Vec::new(), Vec::new());
        let mut m = self.model.clone();
        m.visit_params(&mut |name, p| {
            names.push(name.to_string());
            sizes.push(match p {
                ParamMut::Vector(t) => t.shape().num_elements(),
                ParamMut::Matrix { tensor, .. } => tensor.shape().num_elements(),
            });
            Ok(())
        })?;
        Ok((names, sizes))
    }

    /// A checksum of every parameter's bits (the wrapping sum of their 32-bit patterns, as
    /// an exact integer below 2^52): the same on two ranks only when their weights are.
    pub fn checksum(&self) -> Result<f64> {
        let mut sum = 0u64;
        let mut m = self.model.clone();
        m.visit_params(&mut |_, p| {
            let data = p.data();
            let values = data
                .as_slice::<f32>()
                .map_err(|e| anyhow::anyhow!("reading a parameter: {e:?}"))?;
            for v in values {
                sum = sum.wrapping_add(u64::from(v.to_bits()));
            }
            Ok(())
        })?;
        Ok((sum & ((1 << 52) - 1)) as f64)
    }

    /// A copy of the model for inference on the plain device (no autodiff), computing in f32
    /// as the saved model will (whatever the training's precision).
    pub fn inference_model(&self) -> Result<HfSwitchTransformer> {
        let mut m = self.model.clone();
        m.to_device_f32(&self.inner)
            .context("copying the model for inference")?;
        m.set_compute(DType::F32);
        Ok(m)
    }
}

/// Applies `step` (an optimizer update of the flattened parameter, given the gradient) to
/// the tracked parameter `t` on `ad`, which stays a tracked leaf.
fn updated<const D: usize>(
    t: &mut Tensor<D>,
    grad: Tensor<1>,
    step: &mut dyn FnMut(Tensor<1>, Tensor<1>) -> Tensor<1>,
    ad: &Device,
) {
    let dims = t.dims();
    let n: usize = dims.iter().product();
    let old = std::mem::replace(t, Tensor::zeros([1; D], ad));
    let new = step(old.inner().reshape([n]), grad);
    *t = new.reshape(dims).autodiff().require_grad();
}

/// A host-memory update (`step` of the values, given the gradient) of `theta` on the CPU
/// backend: in place when nothing else holds its storage, else through host copies.
fn host_step(
    theta: Tensor<1>,
    grad: &Tensor<1>,
    step: &mut dyn FnMut(&mut [f32], &[f32]),
) -> Tensor<1> {
    match crate::cpu::adam::update_in_place(theta, grad, |p, g| step(p, g)) {
        Ok(new) => new,
        Err(theta) => {
            let (n, device) = (theta.dims()[0], theta.device());
            let mut v = host_f32(theta);
            step(&mut v, &host_f32(grad.clone()));
            Tensor::from_data(TensorData::new(v, [n]), &device)
        }
    }
}

/// The gradients of `sum_j loss_j / n` over `batches` on `model` (part of an update of `n`
/// micro-batches), each micro-batch's dropout and jitter drawn from its seed; the statistics
/// likewise divided by `n`.
fn micro_gradients(
    model: &mut HfSwitchTransformer,
    batches: &[Batch],
    seeds: &[u64],
    n: usize,
    opt: &Optimisation,
) -> Result<Gradients> {
    let k = n as f64;
    let mut sum: Option<Gradients> = None;
    for (batch, &seed) in batches.iter().zip(seeds) {
        let rng = RoutingRng::seed_from_u64(seed);
        let mut train = Training::new(opt.dropout, opt.jitter, rng);
        let (loss, dropped, layers) = batch_loss(model, batch, Some(&mut train))?;
        // The six parts in one read (one synchronisation on a GPU).
        let parts = [
            &loss.total,
            &loss.cross_entropy,
            &loss.z[0],
            &loss.z[1],
            &loss.aux[0],
            &loss.aux[1],
        ];
        let parts = host_f32(Tensor::cat(
            parts
                .iter()
                .map(|t| (*t).clone().inner().reshape([1]))
                .collect(),
            0,
        ));
        let part = |i: usize| f64::from(parts[i]) / k;
        let stats = UpdateStats {
            loss: part(0),
            cross_entropy: part(1),
            z: [part(2), part(3)],
            aux: [part(4), part(5)],
            dropped: dropped / k,
            tokens: batch.labels.iter().filter(|&&l| l != loss::IGNORE).count(),
            layers: layers
                .into_iter()
                .map(|l| LayerLoad {
                    expert_frac: l.expert_frac.iter().map(|f| f / k).collect(),
                    dropped: l.dropped / k,
                    name: l.name,
                })
                .collect(),
            ..Default::default()
        };
        let mut grads = (loss.total / k).backward();
        let mut params = Vec::new();
        model.visit_params(&mut |name, p| {
            let flat = |g: Tensor<_>| {
                let n = g.shape().num_elements();
                g.reshape([n])
            };
            let (grad, linear, len) = match p {
                ParamMut::Vector(t) => (t.grad_remove(&mut grads), None, t.dims()[0]),
                ParamMut::Matrix { tensor, linear } => (
                    tensor.grad_remove(&mut grads).map(flat),
                    linear.then(|| tensor.dims()),
                    tensor.shape().num_elements(),
                ),
            };
            params.push(ParamGrad {
                name: name.to_string(),
                grad,
                linear,
                len,
            });
            Ok(())
        })?;
        let one = Gradients {
            grads: params,
            stats,
        };
        match &mut sum {
            Some(s) => s.add(one),
            None => sum = Some(one),
        }
    }
    sum.context("a worker without a micro-batch")
}
