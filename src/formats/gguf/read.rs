//! Reading GGUF: header, metadata and tensor directory up front; tensor data on demand,
//! quantized blocks kept as they are or expanded into dense tensors.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::types::{ggml_type_name, type_name, SUPPORTED};
use crate::error::{Error, Result};
use crate::ops::QMatrix;

/// An opened GGUF: metadata and tensor directory (the tensor data stays on disk until read).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: GgmlDType,
    /// Row-major (`[out, in]` for a weight), i.e. GGUF's dimensions reversed.
    pub shape: Vec<usize>,
    pub bytes: usize,
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory, and checks that every tensor's data
    /// lies inside the file (a truncated download fails here, naming the first missing tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut magic = [0u8; 4];
        if len < 4 || f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::format(
                path,
                "not a GGUF file (it does not start with the bytes \"GGUF\")",
            ));
        }
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        let mut reader = std::io::BufReader::new(f);
        let content = Content::read(&mut reader).map_err(|e| {
            // First line only: candle appends a backtrace when RUST_BACKTRACE is set.
            let msg = e.to_string().lines().next().unwrap_or_default().to_string();
            match msg
                .split("unknown dtype for tensor ")
                .nth(1)
                .and_then(|s| {
                    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<u32>().ok()
                })
            {
                Some(id) => Error::format(
                    path,
                    format!(
                        "holds tensors of type {} (ggml type {id}), which qwenclip cannot read; supported: {SUPPORTED}",
                        ggml_type_name(id)
                    ),
                ),
                None => Error::format(
                    path,
                    format!("truncated or corrupt GGUF header ({msg})"),
                ),
            }
        })?;
        // Sizes come from the header: bounded by the file before anything uses them.
        for (name, info) in &content.tensor_infos {
            let bytes = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| {
                    (n / info.ggml_dtype.block_size()).checked_mul(info.ggml_dtype.type_size())
                });
            if bytes.is_none_or(|b| b as u64 > len) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` {:?} is larger than the whole file ({len} bytes)",
                        info.shape.dims()
                    ),
                ));
            }
        }
        let file = Self {
            path: path.to_path_buf(),
            content,
        };
        let mut entries = file.tensors();
        entries.sort_by_key(|e| file.content.tensor_infos[&e.name].offset);
        for e in entries {
            let info = &file.content.tensor_infos[&e.name];
            let block = e.dtype.block_size();
            let elems: usize = e.shape.iter().product();
            if e.shape.last().is_some_and(|&r| !r.is_multiple_of(block))
                || !elems.is_multiple_of(block)
            {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}` {:?} is not a whole number of {} blocks",
                        e.name,
                        e.shape,
                        type_name(e.dtype)
                    ),
                ));
            }
            let end = file
                .content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(e.bytes as u64);
            if end > len {
                return Err(Error::format(
                    path,
                    format!(
                        "truncated: tensor `{}` ends at byte {end} but the file has {len} bytes (an incomplete download?)",
                        e.name
                    ),
                ));
            }
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor, in no particular order.
    pub fn tensors(&self) -> Vec<TensorEntry> {
        self.content
            .tensor_infos
            .iter()
            .map(|(name, info)| Self::entry_of(name, info))
            .collect()
    }

    pub fn entry(&self, name: &str) -> Result<TensorEntry> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        Ok(Self::entry_of(name, info))
    }

    fn entry_of(name: &str, info: &candle_core::quantized::gguf_file::TensorInfo) -> TensorEntry {
        let shape = info.shape.dims().to_vec();
        let elems: usize = shape.iter().product();
        TensorEntry {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            bytes: elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size(),
            shape,
        }
    }

    /// A string entry; `None` when absent or not a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An integer entry of any width; a negative or non-integer value is an error naming the
    /// key.
    pub fn meta_uint(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => match v {
                Value::U8(_)
                | Value::U16(_)
                | Value::U32(_)
                | Value::U64(_)
                | Value::I8(_)
                | Value::I16(_)
                | Value::I32(_)
                | Value::I64(_) => {
                    let n = match v {
                        Value::I8(x) => *x as i64,
                        Value::I16(x) => *x as i64,
                        Value::I32(x) => *x as i64,
                        Value::I64(x) => *x,
                        other => other.to_u64().map(|x| x as i64).unwrap_or(-1),
                    };
                    usize::try_from(n).map(Some).map_err(|_| {
                        Error::format(&self.path, format!("metadata `{key}` is negative ({n})"))
                    })
                }
                other => Err(Error::format(
                    &self.path,
                    format!(
                        "metadata `{key}` should be an integer, found {:?}",
                        other.value_type()
                    ),
                )),
            },
        }
    }

    /// A float as the shortest decimal that round-trips its f32 (1e-6 stays 1e-6).
    pub fn meta_float(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(Error::format(
                &self.path,
                format!(
                    "metadata `{key}` should be a float, found {:?}",
                    other.value_type()
                ),
            )),
        }
    }

    /// A list-of-strings entry.
    pub fn meta_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(Error::format(
                        &self.path,
                        format!("metadata `{key}` should be a list of strings"),
                    )),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(Error::format(
                &self.path,
                format!("metadata `{key}` should be a list"),
            )),
        }
    }

    /// Opens the file for reading tensor data.
    pub fn reader(&self) -> Result<TensorReader<'_>> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(TensorReader { gguf: self, file })
    }
}

/// Reads tensor data from an open [`GgufFile`].
pub struct TensorReader<'a> {
    gguf: &'a GgufFile,
    file: File,
}

impl TensorReader<'_> {
    fn raw(&mut self, name: &str, expected: &[usize]) -> Result<(TensorEntry, Vec<u64>)> {
        let path = &self.gguf.path;
        let entry = self.gguf.entry(name)?;
        if entry.shape != expected {
            return Err(Error::Shape {
                path: path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: entry.shape,
            });
        }
        let info = &self.gguf.content.tensor_infos[name];
        let start = self.gguf.content.tensor_data_offset + info.offset;
        // u64 words: the bytes are reinterpreted as blocks, which needs their alignment.
        let mut words = vec![0u64; entry.bytes.div_ceil(8)];
        // SAFETY: `words` owns at least `entry.bytes` bytes; u8 has alignment 1.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, entry.bytes) };
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| {
                Error::format(path, format!("tensor `{name}`: cannot read its data ({e})"))
            })?;
        Ok((entry, words))
    }

    /// A weight kept quantized (`[out, in]`).
    pub fn qmatrix(
        &mut self,
        name: &str,
        shape: (usize, usize),
        device: &Device,
    ) -> Result<QMatrix> {
        let (entry, words) = self.raw(name, &[shape.0, shape.1])?;
        QMatrix::from_bytes(as_bytes(&words, entry.bytes), entry.dtype, shape, device)
            .map_err(|e| Error::format(&self.gguf.path, format!("tensor `{name}`: {e}")))
    }

    /// Any tensor as a dense tensor of `dtype` (float types are converted, quantized ones
    /// dequantized).
    pub fn dense(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (entry, words) = self.raw(name, shape)?;
        let bytes = as_bytes(&words, entry.bytes);
        let err =
            |e: candle_core::Error| Error::format(&self.gguf.path, format!("tensor `{name}`: {e}"));
        let t = match entry.dtype {
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, &Device::Cpu),
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, &Device::Cpu),
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, &Device::Cpu),
            q => {
                let n: usize = shape.iter().product();
                let row = *shape.last().unwrap_or(&1);
                QMatrix::from_bytes(bytes, q, (n / row.max(1), row), &Device::Cpu)
                    .and_then(|m| m.dequantize())
                    .and_then(|t| t.reshape(shape))
            }
        }
        .map_err(err)?;
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(err)
    }
}

fn as_bytes(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: a u64 slice is at least `8 * words.len() >= len` initialised bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, len) }
}
