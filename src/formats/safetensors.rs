//! Safetensors reading with errors that name the file and tensor, and atomic writing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::atomic::replace_atomic;
use crate::error::{read_json, Error, Result};

/// A set of safetensors files (one file, or the shards of an index) whose headers are read
/// up front; each tensor is read with one positioned read when fetched and converted to the
/// requested dtype and device. Unlike a memory map, this leaves no file pages counted in the
/// process's resident memory next to the loaded copies (half the peak RSS of a mapped load).
pub struct Weights {
    entries: HashMap<String, Entry>,
    origin: PathBuf,
    dtype: DType,
    device: Device,
}

/// Where one tensor's bytes are.
struct Entry {
    path: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    len: usize,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The tensor names of one safetensors file (its header only is read).
pub fn read_tensor_names(path: &Path) -> Result<Vec<String>> {
    let entries = read_header(path).map_err(|m| Error::format(path, m))?;
    Ok(entries.into_iter().map(|(name, _)| name).collect())
}

/// The tensors of one safetensors file, checked against the file's size.
fn read_header(path: &Path) -> std::result::Result<Vec<(String, Entry)>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| "shorter than its header".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(format!("header claims {n} bytes, the file has {size}"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| "truncated header".to_string())?;
    let map: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let h: HeaderEntry =
            serde_json::from_value(v).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let dtype = match h.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            o => return Err(format!("tensor `{name}` has unsupported dtype {o}")),
        };
        let (start, end) = h.data_offsets;
        // `product` wraps in a release build: dimensions that multiply past 2^64 to 0 would
        // pass as an empty tensor.
        let len = h
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}` has shape {:?}: too large", h.shape))?;
        if end < start || (end - start) as usize != len || data_start + end > size {
            return Err(format!(
                "tensor `{name}` lies outside the file (bytes {start}..{end} of a {}-byte data section): truncated?",
                size - data_start
            ));
        }
        out.push((
            name,
            Entry {
                path: path.to_path_buf(),
                dtype,
                shape: h.shape,
                offset: data_start + start,
                len,
            },
        ));
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The shard files a `*.safetensors.index.json` lists (beside it), sorted, each once.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let idx: ShardIndex = read_json(index, "shard index")?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(Error::format(index, "weight_map lists no shard files"));
    }
    Ok(shards)
}

/// Largest `N + 1` over tensor names `{prefix}N.…`, or 0: how many numbered layers a
/// checkpoint has under `prefix`.
pub fn count_numbered(names: &[String], prefix: &str) -> usize {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

impl Weights {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index.is_file() {
            shard_files(&index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        Self::open(&files, dir, dtype, device)
    }

    /// Opens one or more safetensors files; `origin` is what error messages name.
    pub fn open(files: &[PathBuf], origin: &Path, dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(Error::format(f, "file not found"));
            }
        }
        let mut entries = HashMap::new();
        for f in files {
            let tensors = read_header(f)
                .map_err(|e| Error::format(f, format!("not a valid safetensors file ({e})")))?;
            entries.extend(tensors);
        }
        Ok(Self {
            entries,
            origin: origin.to_path_buf(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Shape of a stored tensor without loading it.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.origin.clone(),
            name: name.to_string(),
        })
    }

    /// Loads a tensor, checks its shape, converts it to this set's dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Like [`Weights::get`] with an explicit dtype (e.g. f32 for trainable weights).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        use std::io::{Read, Seek, SeekFrom};
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(Error::Shape {
                path: self.origin.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        let mut bytes = vec![0u8; e.len];
        std::fs::File::open(&e.path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(e.offset))?;
                f.read_exact(&mut bytes)
            })
            .map_err(|err| Error::format(&e.path, format!("tensor `{name}`: {err}")))?;
        let t = Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?;
        drop(bytes);
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }
}

/// Writes tensors to `path` atomically: a temporary file in the same folder, fsync, rename.
/// A crash or a full disk leaves the previous file untouched.
pub fn save_atomic(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = tensors[name].to_device(&Device::Cpu)?.contiguous()?;
        views.push((name.clone(), t));
    }
    let data = safetensors::tensor::serialize(
        views.iter().map(|(n, t)| (n.as_str(), TensorRef(t))),
        metadata,
    )
    .map_err(|e| Error::format(path, format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &data)
}

/// Atomic replacement of a whole file (see [`replace_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    replace_atomic(path, |f| f.write_all(data).map_err(|e| Error::io(path, e)))
}

/// Adapts a candle tensor to the `safetensors` crate's view trait without an extra copy.
struct TensorRef<'a>(&'a Tensor);

impl safetensors::View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.0.dtype() {
            DType::U8 => safetensors::Dtype::U8,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            other => panic!("dtype {other:?} is never written by qwenclip"),
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(tensor_bytes(self.0))
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * self.0.dtype().size_in_bytes()
    }
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    fn bytes<T: candle_core::WithDType>(t: &Tensor) -> Vec<u8> {
        let v = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<T>())
            .expect("cpu tensor");
        // Safety: plain-old-data element types, read as bytes in native (little) endianness.
        unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(&v[..]))
        }
        .to_vec()
    }
    match t.dtype() {
        DType::U8 => bytes::<u8>(t),
        DType::U32 => bytes::<u32>(t),
        DType::I64 => bytes::<i64>(t),
        DType::BF16 => bytes::<half::bf16>(t),
        DType::F16 => bytes::<half::f16>(t),
        DType::F32 => bytes::<f32>(t),
        DType::F64 => bytes::<f64>(t),
        other => panic!("dtype {other:?} is never written by qwenclip"),
    }
}

/// The `__metadata__` map of a safetensors file, reading only its header.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::format(path, "not a safetensors file (shorter than its header)"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::format(
            path,
            format!("not a safetensors file (header claims {n} bytes)"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| Error::format(path, "not a safetensors file (truncated header)"))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("not a safetensors file (header: {e})")))?;
    let meta = json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(meta)
}
