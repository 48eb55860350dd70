//! Which kernel each norm, softmax and rotary embedding runs: candle's fused kernels on the
//! fast path, ops with a backward on the differentiable one.

use candle_core::{DType, Result, Tensor, D};

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Fused kernels, no autograd graph worth keeping.
    Fast,
    /// Only ops with a backward; frozen weights get no gradient.
    Differentiable,
}

/// A large negative bias for masked attention logits. Finite so that a fully masked row (the
/// padding rows of an empty prompt) gives a uniform softmax instead of NaN.
pub const MASKED: f64 = -1e9;

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: ForwardMode) -> Result<Tensor> {
    match path {
        ForwardMode::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        ForwardMode::Differentiable if x.track_op() && super::rms_norm::applies(x, weight) => {
            super::rms_norm::forward(x, weight, eps)
        }
        ForwardMode::Differentiable => {
            let dtype = x.dtype();
            let x = x.to_dtype(compute_dtype(dtype))?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
            normed.to_dtype(dtype)?.broadcast_mul(weight)
        }
    }
}

pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    path: ForwardMode,
) -> Result<Tensor> {
    match path {
        ForwardMode::Fast => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32),
        ForwardMode::Differentiable if super::layer_norm::applies(x, weight, bias) => {
            super::layer_norm::forward(x, weight, bias, eps)
        }
        ForwardMode::Differentiable => candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32),
    }
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor, path: ForwardMode) -> Result<Tensor> {
    match path {
        ForwardMode::Fast => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        ForwardMode::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// Rotary embedding, non-interleaved halves (`rotate_half`, as in Hugging Face Qwen3).
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: ForwardMode) -> Result<Tensor> {
    match path {
        ForwardMode::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        ForwardMode::Differentiable => candle_nn::rotary_emb::rope_slow(x, cos, sin),
    }
}

/// [`rope`] of `x` `[B, T, H, D]` (the projections' layout) returned as `[B, H, T, D]`
/// contiguous (attention's layout). f32 CPU tensors take one fused pass (transpose and
/// rotation, with its own backward); others the transposed copy and [`rope`].
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, path: ForwardMode) -> Result<Tensor> {
    if super::rope::applies(x, cos, sin) {
        return super::rope::to_heads(x, cos, sin);
    }
    rope(&x.transpose(1, 2)?, cos, sin, path)?.contiguous()
}

/// Norms and softmax run in f32 even for half-precision models, as the references do.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}
