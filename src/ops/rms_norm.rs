//! RMSNorm with a frozen weight as one op with its own backward, for CPU training.
//!
//! The composed version (square, mean, add, sqrt, divide, multiply) records six nodes per
//! call and candle's backward then computes a full-size gradient for every operand of each,
//! the frozen weight's included: on Qwen3-0.6B that was ~40% of a CPU training step (112
//! norms per forward). Here the forward is one pass per row and the backward returns only
//! the input gradient, `dx = r (w g) - x r^3 mean(x w g)` with `r = 1/sqrt(mean(x^2) + eps)`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice};

/// The fused op applies to a tracked f32 CPU input and an untracked f32 weight.
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && !weight.track_op()
        && weight.rank() == 1
        && x.dims().last() == Some(&weight.dim(0).unwrap_or(0))
}

pub fn forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.contiguous()?.detach(),
        eps: eps as f32,
    })
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn with_weight<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        let (s, l) = self.weight.storage_and_layout();
        let w = cpu_f32(&s, l).ok_or_else(|| {
            candle_core::Error::Msg("rms-norm: weight must be f32 on the CPU".into())
        })?;
        f(w)
    }

    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = f64::from(dot3(row, row, None)) / row.len().max(1) as f64;
        (1.0 / (ms + f64::from(self.eps)).sqrt()) as f32
    }
}

/// `sum a_i b_i (c_i)` in eight independent f32 accumulators, so the loop vectorises instead
/// of waiting on one serial chain of adds (a row is at most a few thousand values).
fn dot3(a: &[f32], b: &[f32], c: Option<&[f32]>) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let mut tail = 0f32;
    match c {
        None => {
            let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            tail += ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .map(|(x, y)| x * y)
                .sum::<f32>();
            for (x, y) in ca.zip(cb) {
                for l in 0..LANES {
                    acc[l] += x[l] * y[l];
                }
            }
        }
        Some(c) => {
            let (ca, cb, cc) = (
                a.chunks_exact(LANES),
                b.chunks_exact(LANES),
                c.chunks_exact(LANES),
            );
            tail += ca
                .remainder()
                .iter()
                .zip(cb.remainder())
                .zip(cc.remainder())
                .map(|((x, y), z)| x * y * z)
                .sum::<f32>();
            for ((x, y), z) in ca.zip(cb).zip(cc) {
                for l in 0..LANES {
                    acc[l] += x[l] * y[l] * z[l];
                }
            }
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("rms-norm")
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-frozen-weight"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l).ok_or_else(invalid)?;
        let mut y = vec![0f32; x.len()];
        self.with_weight(|w| {
            let h = w.len();
            y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
                let r = self.inv_rms(x);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let mut dx = vec![0f32; x.elem_count()];
        {
            let ((sx, lx), (sg, lg)) = (x.storage_and_layout(), g.storage_and_layout());
            let (xs, gs) = (
                cpu_f32(&sx, lx).ok_or_else(invalid)?,
                cpu_f32(&sg, lg).ok_or_else(invalid)?,
            );
            self.with_weight(|w| {
                let h = w.len();
                dx.par_chunks_mut(h)
                    .zip(xs.par_chunks(h).zip(gs.par_chunks(h)))
                    .for_each(|(dx, (x, g))| {
                        let r = self.inv_rms(x);
                        let dot = dot3(x, g, Some(w));
                        let c = dot / h as f32 * r * r * r;
                        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                            *dx = r * w * g - x * c;
                        }
                    });
                Ok(())
            })?;
        }
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}
