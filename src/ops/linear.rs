//! `x @ w.T` with both operands trainable, forward and backward on the system BLAS.
//!
//! candle's `matmul` records the product, but its backward runs on candle's GEMM and, for the
//! 2-D weight view, through extra transposed copies. LoRA's `A`/`B` and every resampler
//! projection are such products; here the forward is one BLAS product and the backward two,
//! `dx = g @ w` and `dw = g.T @ x`, each computed only when that operand is tracked.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::blas::{self, Blas};
use super::{cpu_f32, f32_slice};

/// The op applies to 2-D contiguous-able f32 CPU operands when a BLAS is loaded.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    blas::get().is_some_and(|b| {
        x.rank() == 2
            && w.rank() == 2
            && x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && x.device().is_cpu()
            && w.device().is_cpu()
            && x.dim(1).ok() == w.dim(1).ok()
            && b.fits((x.dims()[0], w.dims()[0], w.dims()[1]))
    })
}

/// `x` `[rows, in]`, `w` `[out, in]` -> `[rows, out]`. Callers check [`applies`].
pub fn forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

struct Linear;

fn blas() -> Result<&'static Blas> {
    blas::get().ok_or_else(|| candle_core::Error::Msg("linear: no BLAS loaded".into()))
}

fn invalid() -> candle_core::Error {
    candle_core::Error::Msg("linear: operands must be contiguous f32 on the CPU".into())
}

/// `op(a) @ op(b)` of two contiguous f32 CPU tensors as a new `[m, n]` tensor.
fn product(
    (m, n, k): (usize, usize, usize),
    (a, ta): (&Tensor, bool),
    (b, tb): (&Tensor, bool),
) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let out = {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (va, vb) = (
            cpu_f32(&sa, la).ok_or_else(invalid)?,
            cpu_f32(&sb, lb).ok_or_else(invalid)?,
        );
        blas()?.product(1, (m, n, k), (va, ta), (vb, tb))
    };
    Tensor::from_vec(out, (m, n), a.device())
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "blas-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(sx, lx).ok_or_else(invalid)?,
            f32_slice(sw, lw).ok_or_else(invalid)?,
        );
        let (rows, inp) = lx.shape().dims2()?;
        let out = lw.shape().dims2()?.0;
        let y = blas()?.product(1, (rows, out, inp), (x, false), (w, true));
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        let dx = if x.track_op() {
            Some(product((rows, inp, out), (g, false), (w, false))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(product((out, inp, rows), (g, true), (x, false))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}
