//! Fine-tuning data: JSON lines `{"input": "...", "target": "..."}` (what `datasets` exports),
//! tokenised with the model's tokenizer, cut to `max_source_len` / `max_target_len` (counted,
//! never silently), and batched as transformers' seq2seq collator does:
//!
//! ```text
//! input_ids          right-padded with the pad token, attention mask 0 there
//! labels             the target ids, padding replaced by -100 (ignored by the loss)
//! decoder_input_ids  decoder_start_token_id, then the labels shifted right (-100 -> pad)
//! ```

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::loss::IGNORE;
use crate::hf::tokenize::HfTokenizer;

/// One tokenised pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Encoder input ids (with the end-of-sequence token).
    pub input: Vec<i64>,
    /// Target ids (with the end-of-sequence token).
    pub target: Vec<i64>,
    /// The target text, for ROUGE.
    pub target_text: String,
}

/// A tokenised file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Its pairs, in file order.
    pub examples: Vec<Example>,
    /// Inputs cut to `max_source_len`.
    pub cut_inputs: usize,
    /// Targets cut to `max_target_len`.
    pub cut_targets: usize,
}

impl Dataset {
    /// Reads `path`: every non-blank line one JSON object with string fields `input` and
    /// `target`; token ids checked against the vocabulary `vocab`.
    pub fn read(
        path: &Path,
        tokenizer: &HfTokenizer,
        max_source_len: usize,
        max_target_len: usize,
        vocab: usize,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut out = Self {
            examples: Vec::new(),
            cut_inputs: 0,
            cut_targets: 0,
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", path.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let field = |k: &str| -> Result<String> {
                match v.get(k) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(_) => bail!("{}: `{k}` is not a string", at()),
                    None => bail!(
                        "{}: no `{k}` (each line needs {{\"input\": ..., \"target\": ...}})",
                        at()
                    ),
                }
            };
            let (input_text, target_text) = (field("input")?, field("target")?);
            let (input, cut_in) = tokenizer.encode_cut(&input_text, max_source_len)?;
            let (target, cut_tg) = tokenizer.encode_cut(&target_text, max_target_len)?;
            if let Some(bad) = input
                .iter()
                .chain(&target)
                .find(|&&t| t < 0 || t >= vocab as i64)
            {
                bail!(
                    "{}: token id {bad} is outside the model's vocabulary (0..{vocab}): is \
                     tokenizer.json the model's own?",
                    at()
                );
            }
            if input.is_empty() || target.is_empty() {
                bail!("{}: an empty input or target tokenises to nothing", at());
            }
            out.cut_inputs += cut_in as usize;
            out.cut_targets += cut_tg as usize;
            out.examples.push(Example {
                input,
                target,
                target_text,
            });
        }
        if out.examples.is_empty() {
            bail!(
                "{} holds no examples (one JSON object per line: {{\"input\": ..., \"target\": ...}})",
                path.display()
            );
        }
        Ok(out)
    }

    /// The note on cut sequences, if any were cut.
    pub fn cut_note(&self, max_source_len: usize, max_target_len: usize) -> Option<String> {
        (self.cut_inputs + self.cut_targets > 0).then(|| {
            format!(
                "{} of {} inputs cut to max_source_len = {max_source_len} tokens, {} targets to \
                 max_target_len = {max_target_len}",
                self.cut_inputs,
                self.examples.len(),
                self.cut_targets
            )
        })
    }
}

/// A padded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Sequences.
    pub b: usize,
    /// Encoder length.
    pub src: usize,
    /// Decoder length.
    pub tgt: usize,
    /// `[b, src]`.
    pub input_ids: Vec<i64>,
    /// `[b, src]`: 1 for a token, 0 for padding.
    pub mask: Vec<i64>,
    /// `[b, tgt]`, [`IGNORE`] on padding.
    pub labels: Vec<i64>,
    /// `[b, tgt]`.
    pub decoder_input_ids: Vec<i64>,
}

impl Batch {
    /// Pads `examples` (at least one) into a batch.
    pub fn new(examples: &[&Example], pad: i64, decoder_start: i64) -> Self {
        let b = examples.len();
        let src = examples.iter().map(|e| e.input.len()).max().unwrap_or(1);
        let tgt = examples.iter().map(|e| e.target.len()).max().unwrap_or(1);
        let mut out = Self {
            b,
            src,
            tgt,
            input_ids: Vec::with_capacity(b * src),
            mask: Vec::with_capacity(b * src),
            labels: Vec::with_capacity(b * tgt),
            decoder_input_ids: Vec::with_capacity(b * tgt),
        };
        for e in examples {
            for i in 0..src {
                out.input_ids.push(e.input.get(i).copied().unwrap_or(pad));
                out.mask.push((i < e.input.len()) as i64);
            }
            let labels: Vec<i64> = (0..tgt)
                .map(|i| e.target.get(i).copied().unwrap_or(IGNORE))
                .collect();
            out.decoder_input_ids.push(decoder_start);
            out.decoder_input_ids.extend(
                labels[..tgt - 1]
                    .iter()
                    .map(|&l| if l == IGNORE { pad } else { l }),
            );
            out.labels.extend(labels);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_pads_masks_and_shifts_right() {
        let ex = |input: &[i64], target: &[i64]| Example {
            input: input.to_vec(),
            target: target.to_vec(),
            target_text: String::new(),
        };
        let (a, b) = (ex(&[5, 6, 1], &[7, 1]), ex(&[8, 1], &[9, 10, 11, 1]));
        let batch = Batch::new(&[&a, &b], 0, 0);
        assert_eq!((batch.b, batch.src, batch.tgt), (2, 3, 4));
        assert_eq!(batch.input_ids, [5, 6, 1, 8, 1, 0]);
        assert_eq!(batch.mask, [1, 1, 1, 1, 1, 0]);
        assert_eq!(batch.labels, [7, 1, IGNORE, IGNORE, 9, 10, 11, 1]);
        assert_eq!(batch.decoder_input_ids, [0, 7, 1, 0, 0, 9, 10, 11]);
    }
}
