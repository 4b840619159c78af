//! Character-level text data, as labml's `TextFileDataset` + `SequentialUnBatchedDataset`:
//! vocabulary = sorted set of characters; 90/10 train/valid split; non-overlapping windows of
//! `seq_len + 1` characters after a random offset in `[0, seq_len)`; windows shuffled each
//! epoch and batched (the last batch of an epoch may be smaller, as PyTorch's DataLoader).

pub mod download;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Character vocabulary: id = index in the sorted character list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    /// The characters, sorted; a character's id is its index.
    pub chars: Vec<char>,
    #[serde(skip)]
    index: BTreeMap<char, u32>,
}

impl Vocab {
    /// The vocabulary of `text`: its distinct characters, sorted.
    pub(crate) fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A vocabulary of `chars` (sorted and deduplicated here).
    pub(crate) fn from_chars(chars: Vec<char>) -> Self {
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self { chars, index }
    }

    /// Number of characters.
    pub(crate) fn len(&self) -> usize {
        self.chars.len()
    }

    /// Token ids of `text`; an error names the first character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                self.index
                    .get(&c)
                    .copied()
                    .with_context(|| format!("character {c:?} is not in the model's vocabulary"))
            })
            .collect()
    }

    /// The text of `ids` (an id outside the vocabulary becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }

    /// The characters as a JSON array of one-character strings (`vocab.json`).
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&self.chars.iter().collect::<String>()).expect("string to JSON")
    }

    /// Reads [`Self::to_json`]'s form; anything else is an error.
    pub(crate) fn from_json(s: &str) -> Result<Self> {
        let chars: String =
            serde_json::from_str(s).context("vocabulary file is not a JSON string")?;
        Ok(Self::from_chars(chars.chars().collect()))
    }
}

/// The bytes of the data file at `path`, which must be a regular file (or a link to one): a
/// run reads its data again to resume, evaluate and check it, and a FIFO or a device would
/// block there or give another text.
pub fn read_data_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "cannot read the data file {}: give an existing text file with --data",
            path.display()
        )
    })?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        bail!(
            "the data file {} is {kind}: a run reads its data again when it resumes or is \
             evaluated, so give a regular text file with --data (save a stream to a file first)",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read the data file {}", path.display()))
}

/// A text file split into train and validation token streams.
///
/// ```
/// use switch_transformer::data::TextData;
///
/// let data = TextData::from_text(&"To be, or not to be. ".repeat(10), 9)?;
/// // Characters are the tokens: 90% of the text to train on, the rest to validate.
/// assert_eq!((data.train.len(), data.valid.len()), (189, 21));
/// let ids = data.vocab.encode("not to be")?;
/// assert_eq!(data.vocab.decode(&ids), "not to be");
/// assert!(data.vocab.encode("?").is_err()); // not in the text
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct TextData {
    /// The character vocabulary of the whole text.
    pub vocab: Vocab,
    /// The first 90% of the text, encoded.
    pub train: Vec<u32>,
    /// The last 10%, encoded.
    pub valid: Vec<u32>,
}

impl TextData {
    /// Reads a UTF-8 text file; `min_len` is the shortest split allowed (seq_len + 1).
    pub fn load(path: &Path, min_len: usize) -> Result<Self> {
        Self::from_file_bytes(path, read_data_file(path)?, min_len)
    }

    /// The data of `bytes`, the contents of the file at `path` (named in errors).
    pub fn from_file_bytes(path: &Path, bytes: Vec<u8>, min_len: usize) -> Result<Self> {
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "the data file {} is not valid UTF-8 (invalid byte at offset {}): give a UTF-8 text file",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        // A UTF-8 byte-order mark is an encoding marker, not a character of the text.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Self::from_text(text, min_len)
            .with_context(|| format!("the data file {} cannot be used", path.display()))
    }

    /// Encodes and splits `text`; each split must hold at least `min_len` characters.
    pub fn from_text(text: &str, min_len: usize) -> Result<Self> {
        if text.is_empty() {
            bail!("it is empty");
        }
        let vocab = Vocab::from_text(text);
        let ids = vocab.encode(text)?;
        let split = ids.len() * 9 / 10;
        let (train, valid) = (ids[..split].to_vec(), ids[split..].to_vec());
        if valid.len() < min_len {
            bail!(
                "it has {} characters: the 10% validation split must hold at least seq_len + 1 = \
                 {min_len} characters, so the file needs at least {} characters",
                ids.len(),
                min_len * 10
            );
        }
        Ok(Self {
            vocab,
            train,
            valid,
        })
    }
}

/// Non-overlapping `seq_len + 1` windows of a token stream after an offset.
#[derive(Debug, Clone)]
pub(crate) struct Windows {
    /// Tokens per window (the model's input length).
    pub seq_len: usize,
    /// Offset of the first window in the text.
    pub offset: usize,
    /// Number of whole windows.
    pub count: usize,
}

impl Windows {
    /// The windows of `seq_len + 1` characters of a text of `len` characters after `offset`.
    pub(crate) fn new(len: usize, seq_len: usize, offset: usize) -> Self {
        let count = len.saturating_sub(offset + 1) / seq_len;
        Self {
            seq_len,
            offset,
            count,
        }
    }

    /// Input and target of window `i`.
    pub(crate) fn get<'a>(&self, data: &'a [u32], i: usize) -> (&'a [u32], &'a [u32]) {
        let start = self.offset + i * self.seq_len;
        (
            &data[start..start + self.seq_len],
            &data[start + 1..start + self.seq_len + 1],
        )
    }
}

/// A batch of windows, batch-major: inputs and targets `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[batch * seq_len]` input tokens, batch-major.
    pub inputs: Vec<u32>,
    /// `[batch * seq_len]` next tokens (the inputs shifted by one).
    pub targets: Vec<u32>,
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Batch {
    /// The batch of windows `idx` of `data`.
    pub(crate) fn from_windows(data: &[u32], windows: &Windows, idx: &[usize]) -> Self {
        let mut inputs = Vec::with_capacity(idx.len() * windows.seq_len);
        let mut targets = Vec::with_capacity(idx.len() * windows.seq_len);
        for &i in idx {
            let (x, y) = windows.get(data, i);
            inputs.extend_from_slice(x);
            targets.extend_from_slice(y);
        }
        Self {
            inputs,
            targets,
            batch: idx.len(),
            seq_len: windows.seq_len,
        }
    }

    /// Input tokens in the batch.
    pub(crate) fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// `n` equal batches of consecutive windows (`n` must divide `batch`): the shards of the
    /// data-parallel replicas.
    pub fn split(&self, n: usize) -> Vec<Batch> {
        assert!(
            n > 0 && self.batch.is_multiple_of(n),
            "cannot split {} windows into {n} equal shards",
            self.batch
        );
        let len = self.batch / n * self.seq_len;
        (0..n)
            .map(|i| Batch {
                inputs: self.inputs[i * len..(i + 1) * len].to_vec(),
                targets: self.targets[i * len..(i + 1) * len].to_vec(),
                batch: self.batch / n,
                seq_len: self.seq_len,
            })
            .collect()
    }

    /// Inputs and targets as `[batch, seq_len]` int tensors on `device`.
    pub fn tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let t = |v: &[u32]| {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_data(TensorData::new(v, [self.batch, self.seq_len]), device)
        };
        (t(&self.inputs), t(&self.targets))
    }
}

/// One sequence of token ids as a `[1, len]` tensor.
pub(crate) fn sequence_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

/// Where the training loader is: enough to continue exactly after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epochs started (the first is 0).
    pub epoch: u64,
    /// Batches already taken in this epoch.
    pub batch_in_epoch: usize,
}

/// labml's training loader: one random offset (drawn from the seed), windows shuffled each
/// epoch by a generator seeded from `(seed, epoch)`, so any position can be resumed.
#[derive(Debug, Clone)]
pub(crate) struct TrainLoader {
    /// The windows of the current epoch.
    pub windows: Windows,
    /// Windows per batch.
    pub batch_size: usize,
    seed: u64,
    /// Position in the data, saved in checkpoints.
    pub state: LoaderState,
    order: Vec<usize>,
}

impl TrainLoader {
    /// A loader over a training split of `train_len` tokens, shuffled from `seed`.
    pub(crate) fn new(train_len: usize, seq_len: usize, batch_size: usize, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x0ff5e7);
        let offset = rng.random_range(0..seq_len);
        let windows = Windows::new(train_len, seq_len, offset);
        let mut loader = Self {
            windows,
            batch_size,
            seed,
            state: LoaderState {
                epoch: 0,
                batch_in_epoch: 0,
            },
            order: Vec::new(),
        };
        loader.shuffle();
        loader
    }

    /// Batches per epoch (the last may be smaller).
    pub(crate) fn batches_per_epoch(&self) -> usize {
        self.windows.count.div_ceil(self.batch_size)
    }

    /// Continues from a saved position.
    pub(crate) fn restore(&mut self, state: LoaderState) {
        self.state = state;
        self.shuffle();
    }

    fn shuffle(&mut self) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_mul(0x9e3779b97f4a7c15) ^ self.state.epoch,
        );
        self.order = (0..self.windows.count).collect();
        self.order.shuffle(&mut rng);
    }

    /// The next batch of `data`, starting a new epoch (new offset, new order) when needed.
    pub(crate) fn next_batch(&mut self, data: &[u32]) -> Batch {
        if self.state.batch_in_epoch >= self.batches_per_epoch() {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
            self.shuffle();
        }
        let start = self.state.batch_in_epoch * self.batch_size;
        let end = (start + self.batch_size).min(self.windows.count);
        self.state.batch_in_epoch += 1;
        Batch::from_windows(data, &self.windows, &self.order[start..end])
    }
}

/// The first `n` batches of validation windows (offset 0, in order): a fixed set, so every
/// evaluation sees the same text. `n = None` takes every window.
pub fn valid_batches(
    valid: &[u32],
    seq_len: usize,
    batch_size: usize,
    n: Option<usize>,
) -> Vec<Batch> {
    let windows = Windows::new(valid.len(), seq_len, 0);
    let idx: Vec<usize> = (0..windows.count).collect();
    idx.chunks(batch_size)
        .take(n.unwrap_or(usize::MAX))
        .map(|c| Batch::from_windows(valid, &windows, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_is_sorted_characters() {
        let v = Vocab::from_text("hello, world\n");
        assert_eq!(
            v.chars,
            vec!['\n', ' ', ',', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
        );
        let ids = v.encode("hold").unwrap();
        assert_eq!(v.decode(&ids), "hold");
        assert!(v.encode("hex").unwrap_err().to_string().contains("'x'"));
        assert_eq!(Vocab::from_json(&v.to_json()).unwrap(), v);
    }

    #[test]
    fn windows_are_shifted_targets() {
        let data: Vec<u32> = (0..100).collect();
        let w = Windows::new(data.len(), 8, 3);
        assert_eq!(w.count, (100 - 4) / 8);
        let (x, y) = w.get(&data, 2);
        assert_eq!(x, &data[19..27]);
        assert_eq!(y, &data[20..28]);
        // The last window's target stays inside the data.
        let (_, y) = w.get(&data, w.count - 1);
        assert!(*y.last().unwrap() < 100);
    }

    #[test]
    fn loader_covers_each_window_once_per_epoch_and_resumes() {
        let data: Vec<u32> = (0..1000).collect();
        let mut a = TrainLoader::new(data.len(), 10, 7, 42);
        let per_epoch = a.batches_per_epoch();
        let mut firsts = Vec::new();
        for _ in 0..per_epoch {
            let b = a.next_batch(&data);
            firsts.extend(b.inputs.chunks(10).map(|w| w[0]));
        }
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), a.windows.count);
        // Resume mid-epoch: same batches as continuing.
        let mut b = TrainLoader::new(data.len(), 10, 7, 42);
        for _ in 0..per_epoch + 3 {
            a.next_batch(&data);
        }
        let saved = a.state;
        b.restore(saved);
        for _ in 0..per_epoch {
            assert_eq!(a.next_batch(&data), b.next_batch(&data));
        }
    }

    #[test]
    fn bad_text_is_a_clear_error() {
        assert!(
            TextData::from_text("", 65)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let err = TextData::from_text("short text", 65)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least"), "{err}");
    }
}
