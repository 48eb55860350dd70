//! Products with a frozen weight (dense or quantized): the backward returns the input
//! gradient only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::handover::Handover;
use super::matmul::blas_matmul;
use super::{matmul_t, ForwardMode, QMatMulKernel, QMatrix};

/// `x @ w.T` where `w` is frozen: the backward pass returns the input gradient only.
/// Plain `matmul` would also compute a full-size gradient for every frozen base weight
/// (8x the gradient memory on a Qwen3-4B layer).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return matmul_t(x, w);
    }
    if super::linear::applies(x, &[w]) && x.dims().last() == w.dims().last() {
        return super::linear::frozen(x, w);
    }
    let y = matmul_t(&x.detach(), w)?.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: Frozen::Dense(w.detach()),
        y: Handover::new(y),
    })
}

/// `x @ w.T + scale (x @ a.T) @ b.T` for a frozen `w` and trainable LoRA factors `a`
/// `[r, in]`, `b` `[out, r]`, as one BLAS op with its own backward (`ops/linear.rs`); `None`
/// where that does not apply (f32 CPU tensors and a system BLAS), for the caller to compose.
pub fn frozen_linear_lora(
    x: &Tensor,
    w: &Tensor,
    (a, b, scale): (&Tensor, &Tensor, f64),
) -> Result<Option<Tensor>> {
    let inp = x.dims().last().copied();
    let fits = w.dims().last().copied() == inp
        && a.dims().last().copied() == inp
        && b.dims().first() == w.dims().first()
        && b.dims().last() == a.dims().first();
    if !fits || !super::linear::applies(x, &[w, a, b]) {
        return Ok(None);
    }
    super::linear::frozen_with_lora(x, w, a, b, scale).map(Some)
}

/// `x @ w.T` for a quantized frozen weight (GGUF). On [`ForwardMode::Differentiable`] the backward
/// pass returns the input gradient `grad @ W`, dequantizing `W` on the fly for that one
/// product: the dequantized copy is dropped right after and never kept by the graph.
pub fn quantized_linear(x: &Tensor, w: &Arc<QMatrix>, path: ForwardMode) -> Result<Tensor> {
    if path == ForwardMode::Fast {
        return w.forward(x);
    }
    // The training path multiplies by the dequantized weight: exactly the function whose
    // gradient the backward computes (the integer kernels would add activation rounding).
    let y = w.forward_with(&x.detach(), QMatMulKernel::Dequantize)?;
    if !x.track_op() {
        return Ok(y);
    }
    let y = y.contiguous()?;
    x.apply_op1(FrozenLinear {
        w: Frozen::Quantized(w.clone()),
        y: Handover::new(y),
    })
}

/// The frozen weight a [`FrozenLinear`] multiplies the gradient with.
enum Frozen {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

/// The product is computed eagerly with ordinary ops and handed over in `fwd`; only the
/// backward rule is custom.
struct FrozenLinear {
    w: Frozen,
    y: Handover,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda(self.name())
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad.dims();
        let out = dims[dims.len() - 1];
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?;
        let (g, inp) = match &self.w {
            Frozen::Dense(w) => match blas_matmul(&g, w, false)? {
                Some(gx) => (gx, w.dim(1)?),
                None => (g.matmul(w)?, w.dim(1)?),
            },
            // Dequantized a chunk at a time for this product only.
            Frozen::Quantized(q) => (q.grad_input(&g)?, q.dims().1),
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = inp;
        Ok(Some(g.reshape(shape)?))
    }
}
