//! Reading the schema's tensors for the model: from safetensors by Hugging Face name, or from
//! a GGUF by llama.cpp name, where quantized weights stay quantized.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::qwen3::GgufOptions;
use super::schema::TensorSpec;
use crate::error::Result;
use crate::formats::gguf::{is_float, GgufFile, TensorReader};
use crate::formats::Weights;
use crate::lora::Projection;
use crate::ops::QMatrix;

/// A weight matrix as the model holds it: dense, or quantized GGUF blocks (of an embedding,
/// only the looked-up rows are dequantized).
#[derive(Clone)]
pub(super) enum Matrix {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

impl From<Matrix> for Projection {
    fn from(m: Matrix) -> Self {
        match m {
            Matrix::Dense(t) => Projection::dense(t),
            Matrix::Quantized(q) => Projection::quantized(q),
        }
    }
}

/// Where a model's tensors come from.
pub(super) trait TensorSource {
    /// A tensor of the model dtype (norms; every tensor of a safetensors model).
    fn dense(&mut self, t: &TensorSpec) -> Result<Tensor>;

    /// A weight matrix, quantized when the file holds it so (and not asked to expand it).
    fn matrix(&mut self, t: &TensorSpec) -> Result<Matrix>;

    fn projection(&mut self, t: &TensorSpec) -> Result<Projection> {
        Ok(self.matrix(t)?.into())
    }
}

impl TensorSource for &Weights {
    fn dense(&mut self, t: &TensorSpec) -> Result<Tensor> {
        self.get(&t.hf_name, &t.shape)
    }

    fn matrix(&mut self, t: &TensorSpec) -> Result<Matrix> {
        Ok(Matrix::Dense(self.dense(t)?))
    }
}

/// Reads a GGUF's tensors into model parts.
pub(super) struct GgufSource<'g> {
    pub reader: TensorReader<'g>,
    pub gguf: &'g GgufFile,
    pub dtype: DType,
    pub device: Device,
    pub opts: GgufOptions,
}

impl TensorSource for GgufSource<'_> {
    fn dense(&mut self, t: &TensorSpec) -> Result<Tensor> {
        self.reader
            .dense(&t.gguf_name, &t.shape, self.dtype, &self.device)
    }

    /// Float tensors (and everything when dequantizing) become dense weights of the model
    /// dtype.
    fn matrix(&mut self, t: &TensorSpec) -> Result<Matrix> {
        let entry = self.gguf.entry(&t.gguf_name)?;
        if self.opts.dequantize || is_float(entry.dtype) {
            return Ok(Matrix::Dense(self.dense(t)?));
        }
        let shape = (t.shape[0], t.shape[1]);
        let q = self.reader.qmatrix(&t.gguf_name, shape, &self.device)?;
        Ok(Matrix::Quantized(Arc::new(q)))
    }
}
