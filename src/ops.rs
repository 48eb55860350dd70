//! The handful of ops whose fast candle kernels record no gradient (see
//! `shared/notes/candle.md`). Every model calls these with a [`Path`]: `Fast` for inference,
//! `Differentiable` for training. `tests/gradients.rs` checks the differentiable versions
//! against finite differences and `tests/parity.rs` checks both paths agree.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no autograd graph worth keeping.
    Fast,
    /// Only ops with a backward; frozen weights get no gradient.
    Differentiable,
}

/// A large negative bias for masked attention logits. Finite so that a fully masked row (the
/// padding rows of an empty prompt) gives a uniform softmax instead of NaN.
pub const MASKED: f64 = -1e9;

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Path::Differentiable => {
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
    path: Path,
) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32),
        Path::Differentiable => candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32),
    }
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Path::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// Rotary embedding, non-interleaved halves (`rotate_half`, as in Hugging Face Qwen3).
/// `x`: `[B, H, T, D]`; `cos`, `sin`: `[T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        Path::Differentiable => candle_nn::rotary_emb::rope_slow(x, cos, sin),
    }
}

/// `x @ w.T` for `x` of any rank (`[..., in]`) as one 2-D GEMM over the `[out, in]` weight
/// view (the layout candle's GEMM is fastest on).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// `x @ w.T` where `w` is frozen: the backward pass returns the input gradient only.
/// Plain `matmul` would also compute a full-size gradient for every frozen base weight
/// (8x the gradient memory on a Qwen3-4B layer).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return matmul_t(x, w);
    }
    let y = matmul_t(&x.detach(), w)?.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: w.detach(),
        y: Arc::new(Mutex::new(Some(y))),
    })
}

/// The product is computed eagerly with ordinary ops and handed over in `fwd`; only the
/// backward rule is custom. The result is taken out of the op on first use so it is not held
/// twice by the graph.
struct FrozenLinear {
    w: Tensor,
    y: Arc<Mutex<Option<Tensor>>>,
}

impl FrozenLinear {
    fn take(&self) -> Result<Tensor> {
        self.y
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-linear result lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear forward ran twice".into()))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) if layout.start_offset() == 0 => {
                Ok((s.clone(), y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected storage layout"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) if layout.start_offset() == 0 => {
                Ok((s.try_clone(layout)?, y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected storage layout"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad.dims();
        let out = dims[dims.len() - 1];
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?.matmul(&self.w)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = self.w.dim(1)?;
        Ok(Some(g.reshape(shape)?))
    }
}

/// Norms and softmax run in f32 even for half-precision models, as the references do.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}
