//! Host-side tensors and safetensors files.
//!
//! Everything that crosses the program boundary (weights, fixtures, checkpoints) goes through
//! [`TensorFile`]: named host tensors plus the safetensors string metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// The element storage of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// 64-bit integers.
    I64(Vec<i64>),
    /// Bytes (booleans).
    U8(Vec<u8>),
    /// bfloat16 values as their bits, as a checkpoint stored them (widened to f32 exactly by
    /// [`HostTensor::to_f32`]).
    Bf16(Vec<u16>),
}

/// A dense row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: HostData,
}

impl HostTensor {
    /// An f32 tensor; `data` must have the shape's element count.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        Self {
            shape,
            data: HostData::F32(data),
        }
    }

    /// An i64 tensor; `data` must have the shape's element count.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        Self {
            shape,
            data: HostData::I64(data),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32, converting integer and f64 storage.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::Bf16(v) => v
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect(),
        }
    }

    /// Whether the values are bfloat16 as stored.
    pub(crate) fn is_bf16(&self) -> bool {
        matches!(self.data, HostData::Bf16(_))
    }

    /// The first value that is NaN or infinite, if any (integers are always finite).
    pub fn first_non_finite(&self) -> Option<f64> {
        match &self.data {
            HostData::F32(v) => v.iter().find(|x| !x.is_finite()).map(|&x| x as f64),
            HostData::F64(v) => v.iter().find(|x| !x.is_finite()).copied(),
            HostData::Bf16(v) => v
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .find(|x| !x.is_finite())
                .map(|x| x as f64),
            HostData::I64(_) | HostData::U8(_) => None,
        }
    }

    /// The values as f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            HostData::F64(v) => v.clone(),
            _ => self.to_f32().into_iter().map(f64::from).collect(),
        }
    }

    /// The values as i64 (floats truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            HostData::I64(v) => v.clone(),
            HostData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::Bf16(_) => self.to_f32().into_iter().map(|x| x as i64).collect(),
        }
    }

    /// Reads a float tensor back from a device.
    pub(crate) fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        Self::f32(shape, host_f32(t))
    }

    /// Uploads as a float tensor of rank `D`; errors if the rank differs.
    pub(crate) fn to_tensor<const D: usize>(&self, device: &Device) -> Result<Tensor<D>> {
        if self.shape.len() != D {
            bail!("expected a rank-{D} tensor, got shape {:?}", self.shape);
        }
        Ok(Tensor::from_data(
            TensorData::new(self.to_f32(), self.shape.clone()),
            device,
        ))
    }

    /// Matrix transpose of a rank-2 float tensor (bf16 stays bf16; others become f32).
    pub(crate) fn transposed(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "transpose needs a matrix");
        let (r, c) = (self.shape[0], self.shape[1]);
        fn flip<T: Copy + Default>(v: &[T], r: usize, c: usize) -> Vec<T> {
            let mut out = vec![T::default(); r * c];
            for i in 0..r {
                for j in 0..c {
                    out[j * r + i] = v[i * c + j];
                }
            }
            out
        }
        match &self.data {
            HostData::Bf16(v) => Self {
                shape: vec![c, r],
                data: HostData::Bf16(flip(v, r, c)),
            },
            _ => Self::f32(vec![c, r], flip(&self.to_f32(), r, c)),
        }
    }

    fn dtype(&self) -> Dtype {
        match self.data {
            HostData::F32(_) => Dtype::F32,
            HostData::F64(_) => Dtype::F64,
            HostData::I64(_) => Dtype::I64,
            HostData::U8(_) => Dtype::U8,
            HostData::Bf16(_) => Dtype::BF16,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::U8(v) => v.clone(),
            HostData::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// The tensor `name` of a safetensors view; F16 widens to f32 exactly, BF16 is kept as
    /// stored ([`HostData::Bf16`]).
    pub(crate) fn from_view(name: &str, view: &TensorView<'_>) -> Result<Self> {
        let shape = view.shape().to_vec();
        let b = view.data();
        let data = match view.dtype() {
            Dtype::F32 => HostData::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::F64 => HostData::F64(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::I64 => HostData::I64(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::BF16 => HostData::Bf16(
                b.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            Dtype::F16 => HostData::F32(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::U8 | Dtype::BOOL => HostData::U8(b.to_vec()),
            other => bail!(
                "tensor `{name}` has dtype {other:?}; only F32, F64, BF16, F16, I64, U8 are read"
            ),
        };
        Ok(Self { shape, data })
    }
}

/// Reads a float tensor (of any float dtype) back to the host as f32 values, row-major.
pub fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    crate::launches::note_read(&t.device());
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor data")
}

/// Reads an integer tensor back to the host as i64 values, row-major.
pub(crate) fn host_i64<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    crate::launches::note_read(&t.device());
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer tensor data")
}

/// Named host tensors with their safetensors metadata, ordered by name.
#[derive(Debug, Clone, Default)]
pub struct TensorFile {
    /// The tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The file's string metadata.
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Reads a safetensors file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        Self::from_bytes(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))
    }

    /// Parses safetensors bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{e}"))?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{e}"))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            tensors.insert(name.to_string(), HostTensor::from_view(name, &view)?);
        }
        Ok(Self {
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// Serialises to safetensors bytes.
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>> {
        let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dtype(), t.shape.clone(), t.bytes()))
            .collect();
        let views = owned
            .iter()
            .map(|(k, d, s, b)| Ok((k.as_str(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| anyhow!("{e}"))?;
        let meta = (!self.metadata.is_empty()).then(|| self.metadata.clone());
        safetensors::serialize(views, meta).map_err(|e| anyhow!("{e}"))
    }

    /// Writes atomically: a temporary file in the same directory, then a rename.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, &self.to_bytes()?)
    }

    /// The tensor `name`; an error naming it if absent.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("tensor `{name}` is missing"))
    }

    /// Whether there is a tensor `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensors whose name starts with `prefix`, with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> BTreeMap<String, HostTensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect()
    }

    /// The JSON object stored under the metadata key `meta`.
    pub fn meta_json(&self) -> Result<serde_json::Value> {
        let raw = self
            .metadata
            .get("meta")
            .ok_or_else(|| anyhow!("the safetensors metadata has no `meta` key"))?;
        serde_json::from_str(raw).context("the `meta` metadata is not valid JSON")
    }
}
