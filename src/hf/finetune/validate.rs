//! Validation of a fine-tuning run: cross-entropy over the validation targets (eval mode: no
//! dropout, no router losses) and ROUGE-1/2/L of greedy generations (the key/value cache) on
//! the first examples.

use anyhow::Result;
use rand::SeedableRng;

use super::data::{Batch, Dataset};
use super::{batch_loss, rouge};
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

/// Validation loss and, on the first `generate` examples, ROUGE of greedy generations.
pub fn validate(
    model: &HfSwitchTransformer,
    tokenizer: &HfTokenizer,
    data: &Dataset,
    batch_size: usize,
    generate_n: usize,
    max_new: usize,
) -> Result<(Validation, Vec<(String, String)>)> {
    let c = &model.config;
    let (pad, start) = (c.pad(), c.decoder_start());
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in data.examples.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let n = batch
            .labels
            .iter()
            .filter(|&&l| l != super::loss::IGNORE)
            .count();
        let (loss, ..) = batch_loss(model, &batch, None)?;
        sum += f64::from(loss.cross_entropy.into_scalar::<f32>()) * n as f64;
        count += n;
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
    for chunk in data.examples[..take].chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, start);
        let enc = model.encode(&batch.input_ids, &batch.mask, batch.b, batch.src)?;
        let out = generate(model, &enc, &opts, true, Some((eos, pad)), &mut rng)?;
        for (ids, e) in out.iter().zip(chunk) {
            pairs.push((tokenizer.decode(&ids[1..], false)?, e.target_text.clone()));
        }
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
