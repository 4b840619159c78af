//! Where a text's tokens go in every sparse layer of a Hugging Face model: the encoder's on the
//! input (capacity per sequence, as transformers' forward), the decoder's on the greedily
//! generated output (one token per step, as transformers' cached `generate`).

use anyhow::Result;

use super::generate::greedy;
use super::model::HfSwitchTransformer;
use super::sparse::{Grouping, Routes};
use super::tokenize::HfTokenizer;

/// One sparse layer's routing of one sequence.
#[derive(Debug, Clone)]
pub struct LayerRoutes {
    /// `encoder.block.1` or `decoder.block.3`.
    pub name: String,
    /// Per token: its text, expert, router probability of that expert, and whether capacity
    /// dropped it.
    pub tokens: Vec<(String, usize, f32, bool)>,
    /// Tokens sent to each expert (before capacity).
    pub load: Vec<usize>,
    /// Tokens each expert dropped.
    pub dropped: Vec<usize>,
}

fn layers(stack: &str, sparse: &[usize], routes: &[Routes], words: &[String]) -> Vec<LayerRoutes> {
    sparse
        .iter()
        .zip(routes)
        .map(|(&block, r)| {
            let n = r.plan.n_experts;
            let mut load = vec![0; n];
            let mut dropped = vec![0; n];
            let tokens = words
                .iter()
                .enumerate()
                .map(|(t, w)| {
                    let e = r.plan.routes[t];
                    load[e] += 1;
                    dropped[e] += r.plan.dropped[t] as usize;
                    (w.clone(), e, r.prob[t], r.plan.dropped[t])
                })
                .collect();
            LayerRoutes {
                name: format!("{stack}.block.{block}"),
                tokens,
                load,
                dropped,
            }
        })
        .collect()
}

/// The routing of `text` in every sparse layer: the encoder on its tokens, the decoder on
/// `new_tokens` greedily generated ones (the decoder start token first). Returns the layers
/// and the generated text.
pub fn route_text(
    model: &HfSwitchTransformer,
    tok: &HfTokenizer,
    text: &str,
    new_tokens: usize,
) -> Result<(Vec<LayerRoutes>, String)> {
    let batch = tok.encode(&[text.to_string()])?;
    let enc = model.encode(&batch.ids, &batch.mask, 1, batch.len)?;
    let out = greedy(model, &enc, new_tokens, true)?.remove(0);
    // The whole output again, each position routed alone: the cached steps' routing.
    let (_, dec_routes) = model.decode(&out, 1, out.len(), &enc, None, Grouping::PerToken)?;
    let c = &model.config;
    let sparse = |decoder: bool, n: usize| {
        (0..n)
            .filter(|&i| c.is_sparse(decoder, i))
            .collect::<Vec<_>>()
    };
    let words = |ids: &[i64]| ids.iter().map(|&i| tok.token(i)).collect::<Vec<_>>();
    let mut all = layers(
        "encoder",
        &sparse(false, c.num_layers),
        &enc.routes,
        &words(&batch.ids),
    );
    all.extend(layers(
        "decoder",
        &sparse(true, c.decoder_layers()),
        &dec_routes,
        &words(&out),
    ));
    Ok((all, tok.decode(&out[1..], true)?))
}
