//! Exact (erf) GELU as one op with its own backward for f32 CPU tensors: one vectorised pass
//! each way (`vexp`), where candle's scalar-`erf` unary op is followed in the backward by
//! eight composed full-size ops (erf, exp, scale, add, multiply...). The resampler's
//! feed-forward runs it on `[B*77, 4 * width]`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice, vexp};

const CHUNK: usize = 1 << 14;

/// `x Phi(x)`: the fused op for f32 CPU tensors, candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    x.gelu_erf()
}

struct GeluErf;

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("gelu")
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l).ok_or_else(invalid)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| vexp::gelu_erf(x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let mut dx = vec![0f32; x.elem_count()];
        {
            let ((sx, lx), (sg, lg)) = (x.storage_and_layout(), g.storage_and_layout());
            let (xs, gs) = (
                cpu_f32(&sx, lx).ok_or_else(invalid)?,
                cpu_f32(&sg, lg).ok_or_else(invalid)?,
            );
            dx.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                .for_each(|(dx, (x, g))| vexp::gelu_erf_backward(x, g, dx));
        }
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}
