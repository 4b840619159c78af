//! The training loss of `SwitchTransformersForConditionalGeneration(labels=...,
//! output_router_logits=True)` in transformers 5.24.0, reduction for reduction:
//!
//! ```text
//! loss  = CE + z_coef * (z_enc + z_dec) + aux_coef * (aux_enc + aux_dec)
//! CE    = mean over labels != -100 of -log softmax(logits)[label]
//! per stack, its L sparse layers' router logits concatenated along the sequence, [b, L*s, n]:
//! z     = sum over all b * L*s tokens of logsumexp(logits)^2 / (b * L*s)
//! aux   = n^2 * mean over (row, expert) of f[row, i] * P[row, i]
//!         f: the fraction of the row's L*s tokens whose largest logit is expert i (dropped
//!            and padding tokens too), P: the row's mean router probability of expert i
//! ```
//! transformers adds a stack's z and aux only when its sparse step (`num_layers /
//! num_sparse_layers`) is above 1: a stack whose every block is sparse trains without them.
//! Padding tokens count in z and aux (`router_ignore_padding_tokens` is not read there).

use anyhow::{Result, bail};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::hf::HfConfig;
use crate::routing::options::argmax;
use crate::store::host_f32;

/// Label ignored by the cross-entropy (padding).
pub const IGNORE: i64 = -100;

/// The loss and its parts, each a one-element tensor in the graph.
pub struct Seq2SeqLoss {
    /// What is minimised.
    pub total: Tensor<1>,
    /// Cross-entropy over the labels that count.
    pub cross_entropy: Tensor<1>,
    /// Router z-loss of the encoder's and the decoder's sparse layers (before the coefficient).
    pub z: [Tensor<1>; 2],
    /// Load-balancing loss of the encoder's and the decoder's sparse layers (before the
    /// coefficient).
    pub aux: [Tensor<1>; 2],
}

/// Mean cross-entropy of `logits` `[b, t, vocab]` against `labels` (`b * t`, row-major),
/// skipping [`IGNORE`].
pub fn cross_entropy(logits: Tensor<3>, labels: &[i64]) -> Result<Tensor<1>> {
    let [b, t, v] = logits.dims();
    if labels.len() != b * t {
        bail!("{} labels for logits of {b} x {t} positions", labels.len());
    }
    if let Some(bad) = labels
        .iter()
        .find(|&&l| l != IGNORE && !(0..v as i64).contains(&l))
    {
        bail!("label {bad} is outside the vocabulary (0..{v})");
    }
    let count = labels.iter().filter(|&&l| l != IGNORE).count();
    if count == 0 {
        bail!("every label is padding ({IGNORE}): nothing to learn from in this batch");
    }
    let device = logits.device();
    let ids: Vec<i64> = labels.iter().map(|&l| l.max(0)).collect();
    let keep: Vec<f32> = labels.iter().map(|&l| (l != IGNORE) as u8 as f32).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b * t, 1]), &device);
    let keep = Tensor::<2>::from_data(TensorData::new(keep, [b * t, 1]), &device);
    let picked = log_softmax(logits.reshape([b * t, v]), 1).gather(1, ids);
    Ok((picked * keep).sum().neg() / count as f64)
}

/// `num_layers / num_sparse_layers` as transformers sets it (`num_layers` without sparse
/// layers).
fn sparse_step(layers: usize, sparse: usize) -> usize {
    layers.checked_div(sparse).unwrap_or(layers)
}

/// z-loss and load-balancing loss of one stack's router logits (`[b, s, n]` per sparse
/// layer); zeros when there are none.
pub fn router_losses(logits: &[Tensor<3>], device: &Device) -> (Tensor<1>, Tensor<1>) {
    if logits.is_empty() {
        return (Tensor::zeros([1], device), Tensor::zeros([1], device));
    }
    let all = Tensor::cat(logits.to_vec(), 1);
    let [b, s, n] = all.dims();
    let max = all.clone().max_dim(2).detach();
    let lse = max.clone() + (all.clone() - max).exp().sum_dim(2).log();
    let z = lse.powi_scalar(2).sum() / (b * s) as f64;

    // f: which expert has the largest logit, per token (read back: no gradient flows there).
    let host = host_f32(all.clone());
    let mut f = vec![0f32; b * n];
    for (t, row) in host.chunks_exact(n).enumerate() {
        f[(t / s) * n + argmax(row)] += 1.0;
    }
    for x in &mut f {
        *x /= s as f32;
    }
    let f = Tensor::<2>::from_data(TensorData::new(f, [b, n]), device);
    let p = softmax(all, 2).mean_dim(1).reshape([b, n]);
    let aux = (p * f).mean() * (n * n) as f64;
    (z, aux)
}

impl Seq2SeqLoss {
    /// The loss of `logits` against `labels`, with the router logits of the encoder's and
    /// the decoder's sparse layers.
    pub fn new(
        config: &HfConfig,
        logits: Tensor<3>,
        labels: &[i64],
        encoder_router: &[Tensor<3>],
        decoder_router: &[Tensor<3>],
    ) -> Result<Self> {
        let device = logits.device();
        let cross_entropy = cross_entropy(logits, labels)?;
        let stack = |router: &[Tensor<3>], layers: usize, sparse: usize| {
            if sparse_step(layers, sparse) > 1 {
                router_losses(router, &device)
            } else {
                router_losses(&[], &device)
            }
        };
        let (z_enc, a_enc) = stack(
            encoder_router,
            config.num_layers,
            config.num_sparse_encoder_layers,
        );
        let (z_dec, a_dec) = stack(
            decoder_router,
            config.decoder_layers(),
            config.num_sparse_decoder_layers,
        );
        let (z_coef, aux_coef) = (config.router_z_loss_coef, config.router_aux_loss_coef);
        let total = cross_entropy.clone()
            + (z_enc.clone() + z_dec.clone()) * z_coef
            + (a_enc.clone() + a_dec.clone()) * aux_coef;
        Ok(Self {
            total,
            cross_entropy,
            z: [z_enc, z_dec],
            aux: [a_enc, a_dec],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reductions by hand on a 2-row, 2-token, 2-expert case.
    #[test]
    fn router_losses_by_hand() {
        let device = Device::default();
        let l = [1.0f32, 0.0, 0.0, 2.0, 3.0, 1.0, 0.5, 0.5];
        let logits = Tensor::<3>::from_data(TensorData::new(l.to_vec(), [2, 2, 2]), &device);
        let (z, aux) = router_losses(&[logits], &device);
        let lse = |a: f32, b: f32| (a.exp() + b.exp()).ln();
        let zs: f32 = l.chunks(2).map(|c| lse(c[0], c[1]).powi(2)).sum::<f32>() / 4.0;
        let p = |a: f32, b: f32| (a - lse(a, b)).exp();
        // Row 0: experts 0 and 1 once each; row 1: expert 0 twice (the tie goes to 0).
        let p0 = [(p(1.0, 0.0) + p(0.0, 2.0)) / 2.0, (p(3.0, 1.0) + 0.5) / 2.0];
        let p1 = [1.0 - p0[0], 1.0 - p0[1]];
        let want = 4.0 * (0.5 * p0[0] + 0.5 * p1[0] + 1.0 * p0[1] + 0.0 * p1[1]) / 4.0;
        assert!((z.into_scalar::<f32>() - zs).abs() < 1e-5);
        assert!((aux.into_scalar::<f32>() - want).abs() < 1e-5);
    }

    #[test]
    fn cross_entropy_skips_ignored_labels_and_refuses_bad_ones() {
        let device = Device::default();
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 5.0, 0.0, 0.0], [1, 2, 3]),
            &device,
        );
        let ce = cross_entropy(logits.clone(), &[2, IGNORE]).unwrap();
        let want = -(2.0f32 - (1.0f32 + 1f32.exp() + 2f32.exp()).ln());
        assert!((ce.into_scalar::<f32>() - want).abs() < 1e-5);
        let e = cross_entropy(logits.clone(), &[IGNORE, IGNORE])
            .err()
            .unwrap();
        assert!(e.to_string().contains("padding"), "{e}");
        let e = cross_entropy(logits, &[3, 0]).err().unwrap();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }
}
