//! Writing GGUF: tensors quantized one at a time as they are added, then metadata and data
//! written in one atomic file replacement.

use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::atomic::replace_atomic;

/// A GGUF file being assembled; tensors are written in the order they were added.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_metadata(&mut self, entries: impl IntoIterator<Item = (String, Value)>) {
        self.metadata.extend(entries);
    }

    /// Quantizes `t` (any float dtype, row-major) to `want`, or to [`storable_type`] when its
    /// rows do not fit `want`'s blocks; returns whether it fell back.
    pub fn add(&mut self, name: &str, t: &Tensor, want: GgmlDType) -> Result<bool> {
        let ty = storable_type(want, t.dims().last().copied().unwrap_or(1));
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let q = QTensor::quantize(&t, ty)
            .map_err(|e| Error::Invalid(format!("cannot quantize `{name}`: {e}")))?;
        self.tensors.push((name.to_string(), q));
        Ok(ty != want)
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Writes the file atomically (see [`replace_atomic`]).
    pub fn write(self, out: &Path) -> Result<()> {
        let meta: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        replace_atomic(out, |f| {
            let mut w = BufWriter::new(f);
            candle_core::quantized::gguf_file::write(&mut w, &meta, &tensors)
                .map_err(|e| Error::format(out, format!("cannot write GGUF: {e}")))?;
            w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
            Ok(())
        })
    }
}

/// `want`, or when a row of `row` values is not a whole number of its blocks, Q8_0 (blocks
/// of 32), then F32: tiny test models have such rows.
pub fn storable_type(want: GgmlDType, row: usize) -> GgmlDType {
    [want, GgmlDType::Q8_0, GgmlDType::F32]
        .into_iter()
        .find(|t| row.is_multiple_of(t.block_size()))
        .unwrap_or(GgmlDType::F32)
}
