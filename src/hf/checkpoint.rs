//! A Hugging Face checkpoint's tensors: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json` (`weight_map`: tensor name -> file), in f32, bf16 or f16
//! (widened to f32 exactly). Tensor names are transformers' own
//! (`encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight`); `Checkpoint::take` names the
//! missing or mis-shaped tensor when a checkpoint does not match its config.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use safetensors::tensor::{Dtype, Metadata, TensorView};

use crate::store::HostTensor;

/// Where one tensor's bytes are: read only when `Checkpoint::take` asks for it, so loading
/// holds the model and one tensor, never the whole file besides.
#[derive(Debug, Clone)]
pub struct Entry {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    range: (u64, u64),
    /// The file's length and modification time when indexed: a tensor read later (an expert
    /// on first use) is refused if the file changed since.
    stamp: (u64, Option<std::time::SystemTime>),
}

/// One tensor not read yet: in a file, or already in memory.
#[derive(Debug, Clone)]
pub(crate) enum TensorSource {
    /// Bytes in a safetensors file.
    File {
        /// The tensor's name, for messages.
        name: String,
        /// Where it is.
        entry: Entry,
    },
    /// In memory.
    Memory(HostTensor),
}

impl TensorSource {
    /// The tensor, widened to f32 (a read of the file each call).
    pub(crate) fn read(&self) -> Result<HostTensor> {
        let (name, e) = match self {
            Self::Memory(t) => return Ok(t.clone()),
            Self::File { name, entry } => (name, entry),
        };
        let mut f = File::open(&e.file)
            .with_context(|| format!("cannot reopen {} to read `{name}`", e.file.display()))?;
        let meta = f.metadata()?;
        if (meta.len(), meta.modified().ok()) != e.stamp {
            bail!(
                "{} changed since the model was loaded: load it again (reading `{name}`)",
                e.file.display()
            );
        }
        f.seek(SeekFrom::Start(e.range.0))?;
        let mut bytes = vec![0u8; (e.range.1 - e.range.0) as usize];
        f.read_exact(&mut bytes)
            .with_context(|| format!("{}: cannot read tensor `{name}`", e.file.display()))?;
        let view = TensorView::new(e.dtype, e.shape.clone(), &bytes)
            .map_err(|err| anyhow!("{}: tensor `{name}`: {err}", e.file.display()))?;
        let t = HostTensor::from_view(name, &view)?;
        // A NaN or infinite weight makes every output NaN (decoded as padding): refused here,
        // where the tensor is named, for the weights read at load and the experts read later.
        if let Some(v) = t.first_non_finite() {
            bail!(
                "{}: tensor `{name}` holds a non-finite value ({v}): the checkpoint is damaged; \
                 download or convert it again",
                e.file.display()
            );
        }
        Ok(t)
    }
}

/// The tensors of a checkpoint, by name (read from disk one at a time, widened to f32).
#[derive(Debug, Default)]
pub(crate) struct Checkpoint {
    entries: BTreeMap<String, Entry>,
    /// Tensors taken into memory.
    memory: BTreeMap<String, HostTensor>,
}

/// The tensor index of one safetensors file: `u64` header length, JSON header (parsed and
/// checked by the safetensors crate's `Metadata`), data. Only the header is read.
fn index_file(path: &Path, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = f.metadata()?;
    let len = meta.len();
    let stamp = (len, meta.modified().ok());
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{} is not a safetensors file (too short)", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{} is not a safetensors file (header length {n})",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: Metadata = serde_json::from_slice(&header)
        .with_context(|| format!("{}: not a valid safetensors header", path.display()))?;
    let data = 8 + n;
    if data + header.data_len() as u64 > len {
        bail!(
            "{} is truncated: its header describes more data than it holds",
            path.display()
        );
    }
    for (name, info) in header.tensors() {
        if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            bail!(
                "{}: tensor `{name}` is {:?}; weights must be F32, BF16 or F16",
                path.display(),
                info.dtype
            );
        }
        let (s, e) = info.data_offsets;
        out.insert(
            name,
            Entry {
                file: path.to_path_buf(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: (data + s as u64, data + e as u64),
                stamp,
            },
        );
    }
    Ok(())
}

impl Checkpoint {
    /// Indexes the weights of the model directory `dir` (reads no tensor yet).
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no `weight_map` object", index.display()))?;
            let files: BTreeSet<String> = map
                .values()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        anyhow!("{}: a weight_map entry is not a file name", index.display())
                    })
                })
                .collect::<Result<_>>()?;
            files.into_iter().collect()
        } else if dir.join("pytorch_model.bin").exists() {
            bail!(
                "{} has pytorch_model.bin only: convert it to safetensors first (in Python: \
                 `SwitchTransformersForConditionalGeneration.from_pretrained(dir).save_pretrained(dir)`)",
                dir.display()
            );
        } else {
            bail!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            );
        };
        let mut entries = BTreeMap::new();
        for f in &files {
            index_file(&dir.join(f), &mut entries)?;
        }
        Ok(Self {
            entries,
            memory: BTreeMap::new(),
        })
    }

    /// Whether the checkpoint has `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.memory.contains_key(name)
    }

    /// The shape of `name`, if present.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        match self.memory.get(name) {
            Some(t) => Some(&t.shape),
            None => self.entries.get(name).map(|e| e.shape.as_slice()),
        }
    }

    /// Removes and returns tensor `name` (as f32), which must have `shape`.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.take_source(name, shape)?.read()
    }

    /// Removes tensor `name`, which must have `shape`, without reading it: where to read it
    /// from later ([`TensorSource::read`]).
    pub(crate) fn take_source(&mut self, name: &str, shape: &[usize]) -> Result<TensorSource> {
        let found = self.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
            anyhow!(
                "the checkpoint has no tensor `{name}` (shape {shape:?}), which config.json \
                 implies: is config.json the one saved with these weights?"
            )
        })?;
        if found != shape {
            bail!(
                "tensor `{name}` has shape {found:?}, config.json implies {shape:?}: is \
                 config.json the one saved with these weights?"
            );
        }
        if let Some(t) = self.memory.remove(name) {
            return Ok(TensorSource::Memory(t));
        }
        let e = self.entries.remove(name).expect("present");
        Ok(TensorSource::File {
            name: name.to_string(),
            entry: e,
        })
    }

    /// The first of `names` present, removed, with `shape`.
    pub(crate) fn take_first(&mut self, names: &[&str], shape: &[usize]) -> Result<HostTensor> {
        for n in names {
            if self.contains(n) {
                return self.take(n, shape);
            }
        }
        self.take(names[0], shape)
    }

    /// Drops `name` if present (tied copies of the embedding).
    pub(crate) fn discard(&mut self, name: &str) {
        self.entries.remove(name);
        self.memory.remove(name);
    }

    /// Names not taken yet.
    pub(crate) fn remaining(&self) -> Vec<&str> {
        self.entries
            .keys()
            .chain(self.memory.keys())
            .map(String::as_str)
            .collect()
    }
}

/// The precision weights are saved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    /// 32-bit floats (exact).
    F32,
    /// bfloat16 (rounded to nearest even; Google's checkpoints are trained in it).
    Bf16,
    /// IEEE half precision (rounded to nearest even).
    F16,
}

/// Refuses `dir` if it exists and is not an empty directory: a saved model is never
/// overwritten. Called before the work that [`write_dir_whole`] saves.
pub fn refuse_existing(dir: &Path) -> Result<()> {
    if std::fs::read_dir(dir).map_or(dir.exists(), |mut d| d.next().is_some()) {
        bail!(
            "{} already exists: choose a new directory (a saved model is never overwritten)",
            dir.display()
        );
    }
    Ok(())
}

/// Creates the directory `dir` whole or not at all: `write` fills a temporary directory beside
/// it (`.NAME.partial-PID`), which is renamed to `dir` at the end and removed if anything fails
/// (a full disk, a file that cannot be read), so that a retry starts clean. `dir` must not exist
/// yet (or be empty).
pub fn write_dir_whole(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let partial = crate::util::temp_beside(dir, "partial-")?;
    let written = write(&partial).and_then(|()| {
        std::fs::rename(&partial, dir)
            .with_context(|| format!("cannot move {} to {}", partial.display(), dir.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e.context(format!("nothing was written to {}", dir.display())));
    }
    Ok(())
}

/// Files of a model's folder that travel with its weights when a new folder is made from it
/// (fine-tuned, converted, upcycled): the tokenizer and the generation defaults.
const MODEL_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "generation_config.json",
];

/// Copies the tokenizer files and `generation_config.json` that `from` has into `to`.
pub fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    for f in MODEL_FILES {
        let src = from.join(f);
        if src.exists() {
            std::fs::copy(&src, to.join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}

/// A weight to be written: its shape, and its values made when the writer reaches it, so that
/// saving holds one tensor's copy at a time rather than a second copy of the model (written
/// at the end of fine-tuning, the whole copy raised switch-base-8's peak resident memory by
/// 0.4 GB).
pub(crate) struct Deferred<'a> {
    shape: Vec<usize>,
    make: Box<dyn Fn() -> HostTensor + 'a>,
}

impl<'a> Deferred<'a> {
    /// `make` gives a tensor of `shape` (checked when it is called).
    pub(crate) fn new(shape: Vec<usize>, make: impl Fn() -> HostTensor + 'a) -> Self {
        Self {
            shape,
            make: Box::new(make),
        }
    }

    /// `t` as it is, copied to the host when asked for.
    pub(crate) fn tensor<const D: usize>(t: &'a burn::tensor::Tensor<D>) -> Self {
        Self::new(t.dims().to_vec(), || HostTensor::from_tensor(t.clone()))
    }

    /// A linear layer's `[in, out]` weight in PyTorch's `[out, in]`, when asked for.
    pub(crate) fn linear(w: &'a burn::tensor::Tensor<2>) -> Self {
        let [i, o] = w.dims();
        Self::new(vec![o, i], || crate::hf::linear::host_linear(w))
    }

    /// A tensor already on the host (copied when asked for).
    pub(crate) fn ready(t: HostTensor) -> Self {
        Self::new(t.shape.clone(), move || t.clone())
    }

    /// The values.
    pub(crate) fn make(&self) -> HostTensor {
        let t = (self.make)();
        assert_eq!(t.shape, self.shape, "a deferred tensor's shape");
        t
    }
}

/// Weights by name, each made when it is asked for.
pub(crate) type Weights<'a> = BTreeMap<String, Deferred<'a>>;

/// One deferred tensor as safetensors writes it: encoded in `dtype` when its bytes are asked
/// for.
struct Encoded<'d, 'a> {
    tensor: &'d Deferred<'a>,
    dtype: Dtype,
    encode: fn(&[f32]) -> Vec<u8>,
}

impl safetensors::View for Encoded<'_, '_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (self.encode)(&self.tensor.make().to_f32()).into()
    }

    fn data_len(&self) -> usize {
        self.tensor.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `tensors` as `dir/model.safetensors` in `dtype` and `config_json` as
/// `dir/config.json`: the layout `from_pretrained` reads. Refuses to overwrite a directory
/// that already holds a model.
pub(crate) fn save(
    dir: &Path,
    config_json: &str,
    tensors: BTreeMap<String, Deferred<'_>>,
    dtype: SaveDtype,
) -> Result<()> {
    for f in [
        "model.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ] {
        if dir.join(f).exists() {
            bail!(
                "{} already exists: choose a new directory (a saved model is never overwritten)",
                dir.join(f).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    type Encode = fn(&[f32]) -> Vec<u8>;
    let (st_dtype, bytes): (Dtype, Encode) = match dtype {
        SaveDtype::F32 => (Dtype::F32, |v| {
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }),
        SaveDtype::Bf16 => (Dtype::BF16, |v| {
            v.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        }),
        SaveDtype::F16 => (Dtype::F16, |v| {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        }),
    };
    // Each tensor's values made and encoded as the writer reaches it.
    let views = tensors.iter().map(|(k, t)| {
        let view = Encoded {
            tensor: t,
            dtype: st_dtype,
            encode: bytes,
        };
        (k.as_str(), view)
    });
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::util::write_atomic_with(&dir.join("model.safetensors"), |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp).map_err(|e| anyhow!("{e}"))
    })?;
    crate::util::write_atomic(&dir.join("config.json"), config_json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Each deferred tensor is made once, when the writer reaches it (after the header, one
    /// at a time), and reads back as made, in every dtype.
    #[test]
    fn deferred_tensors_are_made_once_each_and_read_back() {
        let made = Cell::new(0);
        let values = |n: usize, k: f32| (0..n).map(|i| i as f32 * k).collect::<Vec<f32>>();
        let a = HostTensor::f32(vec![2, 3], values(6, 0.5));
        let b = HostTensor::f32(vec![4], values(4, -0.25));
        for dtype in [SaveDtype::F32, SaveDtype::Bf16, SaveDtype::F16] {
            let dir = std::env::temp_dir()
                .join(format!("switch-deferred-{}-{dtype:?}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let deferred = |t: &HostTensor| {
                let t = t.clone();
                let made = &made;
                Deferred::new(t.shape.clone(), move || {
                    made.set(made.get() + 1);
                    t.clone()
                })
            };
            let tensors: Weights = [
                ("a".to_string(), deferred(&a)),
                ("b".to_string(), deferred(&b)),
            ]
            .into();
            made.set(0);
            save(&dir, "{}", tensors, dtype).unwrap();
            assert_eq!(made.get(), 2, "{dtype:?}");
            let mut ck = Checkpoint::read(&dir).unwrap();
            assert_eq!(ck.take("a", &[2, 3]).unwrap().to_f32(), a.to_f32());
            assert_eq!(ck.take("b", &[4]).unwrap().to_f32(), b.to_f32());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
