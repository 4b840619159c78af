//! Validation of a fine-tuning run: cross-entropy over the validation targets (eval mode: no
//! dropout, no router losses) and ROUGE-1/2/L of greedy generations (the key/value cache) on
//! the first examples.

use anyhow::Result;
use rand::SeedableRng;

use super::data::{Batch, Dataset};
use super::{batch_loss, rouge};
use crate::distributed::Collective;
use crate::hf::generate::generate;
use crate::hf::model::HfSwitchTransformer;
use crate::hf::tokenize::HfTokenizer;
use crate::infer::generate::SampleOptions;
use crate::routing::RoutingRng;

/// One validation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Validation {
    /// Cross-entropy over the validation targets (eval mode: no dropout, no router losses).
    pub loss: f64,
    /// ROUGE-1, ROUGE-2, ROUGE-L F-measures of the generations (0 when none were scored).
    pub rouge: [f64; 3],
}

/// Validation loss and, on the first `generate` examples, ROUGE of greedy generations. In a
/// job of several ranks (`world`) each rank takes every size-th batch, and every rank ends
/// with the whole validation.
pub fn validate(
    model: &HfSwitchTransformer,
    tokenizer: &HfTokenizer,
    data: &Dataset,
    batch_size: usize,
    generate_n: usize,
    max_new: usize,
    world: Option<&dyn Collective>,
) -> Result<(Validation, Vec<(String, String)>)> {
    let c = &model.config;
    let (pad, start) = (c.pad(), c.decoder_start());
    let (rank, ranks) = world.map_or((0, 1), |w| (w.rank(), w.size()));
    let mine = |i: &(usize, _)| i.0 % ranks == rank;
    // Each batch's loss sum and token count at its place, added in the batches' order (the
    // same sum whichever rank computed which).
    let chunks = data.examples.len().div_ceil(batch_size);
    let mut parts = vec![0.0; 2 * chunks];
    for (i, chunk) in data.examples.chunks(batch_size).enumerate().filter(mine) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let n = batch
            .labels
            .iter()
            .filter(|&&l| l != super::loss::IGNORE)
            .count();
        let (loss, ..) = batch_loss(model, &batch, None)?;
        parts[2 * i] = f64::from(loss.cross_entropy.into_scalar::<f32>()) * n as f64;
        parts[2 * i + 1] = n as f64;
    }
    if let Some(w) = world {
        w.all_reduce_sum_f64("validation loss", &mut parts)?;
    }
    let (mut sum, mut count) = (0.0, 0usize);
    for p in parts.chunks(2) {
        sum += p[0];
        count += p[1].round() as usize;
    }
    let mut pairs = Vec::new();
    let eos = c.eos_token_id.unwrap_or(1);
    let opts = SampleOptions {
        max_tokens: max_new,
        temperature: 0.0,
        top_k: None,
        context: usize::MAX,
    };
    let mut rng = RoutingRng::seed_from_u64(0);
    let take = generate_n.min(data.examples.len());
    for (_, chunk) in data.examples[..take]
        .chunks(batch_size)
        .enumerate()
        .filter(mine)
    {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let enc = model.encode(&batch.input_ids, &batch.mask, batch.b, batch.src)?;
        let out = generate(model, &enc, &opts, true, Some((eos, pad)), &mut rng)?;
        for (ids, e) in out.iter().zip(chunk) {
            pairs.push((tokenizer.decode(&ids[1..], false)?, e.target_text.clone()));
        }
    }
    if let Some(w) = world {
        pairs = gather_pairs(w, &pairs, batch_size, take)?;
    }
    let rouge = if pairs.is_empty() {
        [0.0; 3]
    } else {
        rouge::corpus(&pairs)
    };
    Ok((
        Validation {
            loss: sum / count.max(1) as f64,
            rouge,
        },
        pairs,
    ))
}

/// Every rank's generations (`mine`: those of the batches `i` with `i % ranks == rank`) on
/// every rank, in the examples' order.
fn gather_pairs(
    w: &dyn Collective,
    mine: &[(String, String)],
    batch_size: usize,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let mut from: Vec<std::vec::IntoIter<(String, String)>> = Vec::new();
    for root in 0..w.size() {
        let mut bytes = if root == w.rank() {
            serde_json::to_vec(mine)?
        } else {
            Vec::new()
        };
        w.broadcast("validation generations", root, &mut bytes)?;
        let theirs: Vec<(String, String)> = serde_json::from_slice(&bytes)?;
        from.push(theirs.into_iter());
    }
    let mut all = Vec::with_capacity(n);
    for i in 0..n.div_ceil(batch_size) {
        let rank = &mut from[i % w.size()];
        all.extend(rank.by_ref().take(batch_size.min(n - i * batch_size)));
    }
    Ok(all)
}
