//! LayerNorm with a trainable weight and bias as one op with its own backward, for f32 CPU
//! training (the resampler's norms). The composed version (`layer_norm_slow`: mean,
//! subtract, square, mean, add, sqrt, divide, multiply, add) records nine nodes per call.
//! Backward, with `xh = (x - mean) r`, `r = 1/sqrt(var + eps)`:
//! `dx = r (w g - mean(w g) - xh mean(w g xh))`, `dw = sum_rows g xh`, `db = sum_rows g`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice};

/// Columns per task of the weight and bias gradient (a sum over rows).
const COLUMNS: usize = 256;

/// The op applies to f32 CPU `x` `[..., h]` with `weight` and `bias` `[h]`.
pub fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let h = x.dims().last().copied();
    [x, weight, bias]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
        && weight.rank() == 1
        && weight.dims().first().copied() == h
        && bias.dims() == weight.dims()
}

pub fn forward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("layer-norm")
}

impl LayerNorm {
    /// `(mean, 1/sqrt(var + eps))` of a row, accumulated in f64.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len().max(1) as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (
            mean as f32,
            (1.0 / (var + f64::from(self.eps)).sqrt()) as f32,
        )
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [Some(x), Some(w), Some(b)] =
            [(sx, lx), (sw, lw), (sb, lb)].map(|(s, l)| f32_slice(s, l))
        else {
            return Err(invalid());
        };
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h.max(1))
            .zip(x.par_chunks(h.max(1)))
            .for_each(|(y, x)| {
                let (mean, r) = self.stats(x);
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * r * w + b;
                }
            });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let h = w.elem_count().max(1);
        let guards = [x, w, &g].map(|t| t.storage_and_layout());
        let [Some(xs), Some(ws), Some(gs)] = guards.each_ref().map(|(s, l)| cpu_f32(s, l)) else {
            return Err(invalid());
        };
        let stats: Vec<(f32, f32)> = xs.par_chunks(h).map(|r| self.stats(r)).collect();
        let dx = if x.track_op() {
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(h)
                .zip(xs.par_chunks(h).zip(gs.par_chunks(h)))
                .zip(&stats)
                .for_each(|((dx, (x, g)), &(mean, r))| {
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for ((&x, &g), &w) in x.iter().zip(g).zip(ws) {
                        let wg = f64::from(w * g);
                        s1 += wg;
                        s2 += wg * f64::from((x - mean) * r);
                    }
                    let (m1, m2) = ((s1 / h as f64) as f32, (s2 / h as f64) as f32);
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(ws) {
                        *dx = r * (w * g - m1 - (x - mean) * r * m2);
                    }
                });
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        // Weight and bias gradients: sums over rows, a block of columns per task.
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        dw.par_chunks_mut(COLUMNS)
            .zip(db.par_chunks_mut(COLUMNS))
            .enumerate()
            .for_each(|(blk, (dw, db))| {
                let c0 = blk * COLUMNS;
                for ((x, g), &(mean, r)) in xs.chunks(h).zip(gs.chunks(h)).zip(&stats) {
                    let (x, g) = (&x[c0..c0 + dw.len()], &g[c0..c0 + dw.len()]);
                    for (((dw, db), &x), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                        *dw += g * (x - mean) * r;
                        *db += g;
                    }
                }
            });
        let param = |t: &Tensor, v: Vec<f32>| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| Tensor::from_vec(v, t.shape(), t.device()))
                .transpose()
        };
        Ok((dx, param(w, dw)?, param(b, db)?))
    }
}
