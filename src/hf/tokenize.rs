//! Text to token ids and back with the checkpoint's `tokenizer.json` (the `tokenizers`
//! crate: T5's SentencePiece Unigram, sentinels `<extra_id_N>` included). A batch is padded
//! on the right with the pad token, its attention mask 0 there.

use std::path::Path;

use anyhow::{Result, anyhow};

/// A checkpoint's tokenizer.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    pad: i64,
}

/// Token ids of a batch, right-padded, with their attention mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[batch, len]`, row-major.
    pub ids: Vec<i64>,
    /// 1 for a token, 0 for padding.
    pub mask: Vec<i64>,
    /// Sequences.
    pub batch: usize,
    /// Longest sequence.
    pub len: usize,
}

impl HfTokenizer {
    /// Reads `dir/tokenizer.json`; `pad` is the model's pad token.
    pub fn load(dir: &Path, pad: i64) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            anyhow::bail!(
                "{} not found: this command needs the checkpoint's tokenizer.json (a repository \
                 with spiece.model only can make one: in Python, \
                 `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)",
                path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(Self { inner, pad })
    }

    /// Tokens of `text` (with the end-of-sequence token the tokenizer appends), at most
    /// `max_len` of them: a longer text loses its last tokens before the end-of-sequence
    /// token, as transformers' `truncation=True` cuts it. Also says whether it was cut.
    pub fn encode_cut(&self, text: &str, max_len: usize) -> Result<(Vec<i64>, bool)> {
        let e = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenise {text:?}: {e}"))?;
        let mut ids: Vec<i64> = e.get_ids().iter().map(|&i| i as i64).collect();
        if ids.len() <= max_len || max_len == 0 {
            return Ok((ids, false));
        }
        let last = *ids.last().expect("longer than max_len");
        let ends_special = e.get_special_tokens_mask().last() == Some(&1);
        ids.truncate(max_len);
        if ends_special {
            ids[max_len - 1] = last;
        }
        Ok((ids, true))
    }

    /// Tokens of every text (with the end-of-sequence token the tokenizer appends).
    pub fn encode(&self, texts: &[String]) -> Result<Batch> {
        if texts.is_empty() {
            anyhow::bail!("no input text");
        }
        let rows: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| {
                self.inner
                    .encode(t.as_str(), true)
                    .map(|e| e.get_ids().iter().map(|&i| i as i64).collect())
                    .map_err(|e| anyhow!("cannot tokenise {t:?}: {e}"))
            })
            .collect::<Result<_>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for r in &rows {
            ids.extend(
                r.iter()
                    .copied()
                    .chain(std::iter::repeat(self.pad))
                    .take(len),
            );
            mask.extend((0..len).map(|i| (i < r.len()) as i64));
        }
        Ok(Batch {
            ids,
            mask,
            batch: rows.len(),
            len,
        })
    }

    /// The text of `ids`; special tokens (pad, end of sequence, sentinels) kept when
    /// `keep_special`.
    pub fn decode(&self, ids: &[i64], keep_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, !keep_special)
            .map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))
    }

    /// The string of one token id.
    pub fn token(&self, id: i64) -> String {
        self.inner
            .id_to_token(id as u32)
            .unwrap_or_else(|| format!("<{id}>"))
    }
}
