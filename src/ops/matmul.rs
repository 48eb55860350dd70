//! Dense products: `x @ w.T` for the models' projections and the batched products of
//! attention, on the system BLAS where it applies.

use candle_core::{DType, Result, Tensor};

use super::{blas, cpu_f32};

/// `x @ w.T` for `x` of any rank (`[..., in]`) as one 2-D GEMM over the `[out, in]` weight
/// view (the layout candle's GEMM is fastest on). Tracked f32 CPU operands take the BLAS op
/// with its own backward (`ops/linear.rs`).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op();
    if tracked && super::linear::applies(x, &[w]) && x.dims().last() == w.dims().last() {
        return super::linear::trainable(x, w);
    }
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let x = x.reshape((rows, inner))?;
    let blas = if tracked {
        None
    } else {
        blas_matmul(&x, w, true)?
    };
    let y = match blas {
        Some(y) => y,
        None => x.matmul(&w.t()?)?,
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

/// `x @ w.T + b` (a resampler projection). Tracked f32 CPU operands take one BLAS op with
/// its own backward for all three (`ops/linear.rs`); others [`matmul_t`] and a broadcast add.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = b else {
        return matmul_t(x, w);
    };
    let tracked = [x, w, b].iter().any(|t| t.track_op());
    let fits = x.dims().last() == w.dims().last() && b.dims() == &w.dims()[..1];
    if tracked
        && fits
        && b.dtype() == DType::F32
        && b.device().is_cpu()
        && super::linear::applies(x, &[w])
    {
        return super::linear::trainable_with_bias(x, w, b);
    }
    matmul_t(x, w)?.broadcast_add(b)
}

/// Batched `a @ b.T` (`b_transposed`) or `a @ b` over the leading dimensions: attention's
/// products. On the system BLAS for untracked f32 CPU tensors, else candle's matmul.
pub fn batched_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        if let Some(y) = blas_matmul(a, b, b_transposed)? {
            return Ok(y);
        }
    }
    if b_transposed {
        a.matmul(&b.t()?)
    } else {
        a.matmul(b)
    }
}

/// `a @ b.T` (`b_transposed`) or `a @ b` for f32 CPU tensors of equal rank >= 2 and equal
/// leading (batch) dimensions, on the system BLAS when there is one ([`blas`]); `None` where
/// that does not apply (candle's GEMM then). The result records no autograd op: callers use
/// it only where no gradient flows through the product.
pub(super) fn blas_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Option<Tensor>> {
    let Some(blas) = blas::get() else {
        return Ok(None);
    };
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !a.device().is_cpu() {
        return Ok(None);
    }
    let (da, db) = (a.dims(), b.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] {
        return Ok(None); // broadcasting, or candle reports the shape error
    }
    let batch: usize = da[..r - 2].iter().product();
    let (m, k) = (da[r - 2], da[r - 1]);
    let (n, kb) = if b_transposed {
        (db[r - 2], db[r - 1])
    } else {
        (db[r - 1], db[r - 2])
    };
    if k != kb || !blas.fits((m, n, k)) {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let out = {
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        let (Some(va), Some(vb)) = (cpu_f32(&sa, la), cpu_f32(&sb, lb)) else {
            return Ok(None);
        };
        blas.product(batch, (m, n, k), (va, false), (vb, b_transposed))
    };
    let mut shape = da.to_vec();
    shape[r - 1] = n;
    Tensor::from_vec(out, shape, a.device()).map(Some)
}
