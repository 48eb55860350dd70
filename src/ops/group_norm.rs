//! Group norm with a frozen affine weight and bias, optionally followed by SiLU (the pair
//! every UNet resnet starts with), as one op with its own backward for f32 CPU tensors.
//!
//! candle's composed group norm (`candle_nn::GroupNorm`: reshape, sum, divide, subtract,
//! square, sum, divide, add, sqrt, divide, multiply, add) records a dozen full-size nodes
//! per call and its backward computes gradients for the frozen weight and bias too; SiLU adds
//! a scalar-`exp` pass and two more nodes. Here: one pass for the statistics, one for the
//! output (SiLU through the vectorised `exp`); the backward recomputes the statistics and
//! returns the input gradient only. With `xh = (x - mean) r`, `r = 1/sqrt(var + eps)`,
//! `y = w xh + b`, `z = silu(y)` and `gy = dz sigmoid(y) (1 + y (1 - sigmoid(y)))`:
//! `dx = r (w gy - mean(w gy) - xh mean(w gy xh))`, means over the group.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice, vexp};

/// Elements of the scratch buffer the SiLU's `exp` runs on.
const CHUNK: usize = 4096;

/// `group_norm(x) * w + b` over `groups` groups of channels of `x` `[B, C, ...]` (`w`, `b`
/// `[C]`, frozen: they get no gradient), then SiLU when `silu`. Statistics in f32 for
/// half-precision input, as torch computes them.
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2
        || groups == 0
        || !dims[1].is_multiple_of(groups)
        || w.dims() != [dims[1]]
        || b.dims() != [dims[1]]
    {
        candle_core::bail!(
            "group norm: input {dims:?} with {groups} groups and weight {:?}",
            w.dims()
        );
    }
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if f32_cpu(x) && f32_cpu(w) && f32_cpu(b) {
        return x.contiguous()?.apply_op1(GroupNorm {
            w: w.contiguous()?.detach(),
            b: b.contiguous()?.detach(),
            groups,
            eps,
            silu,
        });
    }
    let y = composed(x, &w.detach(), &b.detach(), groups, eps)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// candle_nn's `GroupNorm::forward`, differentiable with ordinary ops.
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (batch, c) = (dims[0], dims[1]);
    let n = x.elem_count() / (batch * groups).max(1);
    let dtype = x.dtype();
    let x = x
        .reshape((batch, groups, n))?
        .to_dtype(super::compute_dtype(dtype))?;
    let mean = (x.sum_keepdim(2)? / n as f64)?;
    let x = x.broadcast_sub(&mean)?;
    let var = (x.sqr()?.sum_keepdim(2)? / n as f64)?;
    let x = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut wd = vec![1; dims.len()];
    wd[1] = c;
    x.to_dtype(dtype)?
        .reshape(dims)?
        .broadcast_mul(&w.reshape(wd.clone())?)?
        .broadcast_add(&b.reshape(wd)?)
}

struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("group-norm")
}

/// `(mean, 1/sqrt(var + eps))` of one group, accumulated in f64.
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

impl GroupNorm {
    /// `(channels per group, elements per channel)` for input `shape`.
    fn sizes(&self, shape: &Shape) -> (usize, usize) {
        let d = shape.dims();
        let c = d[1];
        let spatial = d[2..].iter().product::<usize>();
        (c / self.groups, spatial)
    }

    /// Normalised, affine `y` of group `g`'s elements `x` (channels `g*cg..`) into `out`.
    fn affine(
        &self,
        x: &[f32],
        (w, b): (&[f32], &[f32]),
        (mean, r): (f32, f32),
        spatial: usize,
        out: &mut [f32],
    ) {
        for ((xc, yc), (&w, &b)) in x
            .chunks(spatial.max(1))
            .zip(out.chunks_mut(spatial.max(1)))
            .zip(w.iter().zip(b))
        {
            let (scale, shift) = (r * w, b - mean * r * w);
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = x * scale + shift;
            }
        }
    }
}

/// `s = sigmoid(y)` into `s` (same length), through the vectorised `exp`.
fn sigmoid(y: &[f32], s: &mut [f32]) {
    for (s, &y) in s.iter_mut().zip(y) {
        *s = -y;
    }
    vexp::exp_in_place(s);
    for s in s.iter_mut() {
        *s = 1.0 / (1.0 + *s);
    }
}

impl CustomOp1 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx).ok_or_else(invalid)?;
        let (cg, spatial) = self.sizes(lx.shape());
        let (ws, wl) = self.w.storage_and_layout();
        let (bs, bl) = self.b.storage_and_layout();
        let (w, b) = (
            cpu_f32(&ws, wl).ok_or_else(invalid)?,
            cpu_f32(&bs, bl).ok_or_else(invalid)?,
        );
        let group = (cg * spatial).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(group)
            .zip(x.par_chunks(group))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let g = i % self.groups;
                let wb = (&w[g * cg..(g + 1) * cg], &b[g * cg..(g + 1) * cg]);
                self.affine(x, wb, stats(x, self.eps), spatial, y);
                if self.silu {
                    let mut s = vec![0f32; CHUNK.min(y.len())];
                    for y in y.chunks_mut(CHUNK) {
                        let s = &mut s[..y.len()];
                        sigmoid(y, s);
                        y.iter_mut().zip(s.iter()).for_each(|(y, &s)| *y *= s);
                    }
                }
            });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _z: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (cg, spatial) = self.sizes(x.shape());
        let group = (cg * spatial).max(1);
        let mut dx = vec![0f32; x.elem_count()];
        {
            let guards = [x, &grad, &self.w, &self.b].map(|t| t.storage_and_layout());
            let [Some(xs), Some(gs), Some(w), Some(b)] =
                guards.each_ref().map(|(s, l)| cpu_f32(s, l))
            else {
                return Err(invalid());
            };
            dx.par_chunks_mut(group)
                .zip(xs.par_chunks(group).zip(gs.par_chunks(group)))
                .enumerate()
                .for_each(|(i, (dx, (x, dz)))| {
                    let g = i % self.groups;
                    let (w, b) = (&w[g * cg..(g + 1) * cg], &b[g * cg..(g + 1) * cg]);
                    let (mean, r) = stats(x, self.eps);
                    // dx first holds w * gy, the gradient of the normalised input.
                    if self.silu {
                        self.affine(x, (w, b), (mean, r), spatial, dx);
                        let mut s = vec![0f32; CHUNK.min(dx.len())];
                        for (y, dz) in dx.chunks_mut(CHUNK).zip(dz.chunks(CHUNK)) {
                            let s = &mut s[..y.len()];
                            sigmoid(y, s);
                            for ((y, &s), &dz) in y.iter_mut().zip(s.iter()).zip(dz) {
                                *y = dz * s * (1.0 + *y * (1.0 - s));
                            }
                        }
                    } else {
                        dx.copy_from_slice(dz);
                    }
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for ((dxc, xc), &w) in dx
                        .chunks_mut(spatial.max(1))
                        .zip(x.chunks(spatial.max(1)))
                        .zip(w)
                    {
                        for (d, &x) in dxc.iter_mut().zip(xc) {
                            *d *= w;
                            s1 += f64::from(*d);
                            s2 += f64::from(*d) * f64::from((x - mean) * r);
                        }
                    }
                    let n = group as f64;
                    let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
                    for (d, &x) in dx.iter_mut().zip(x) {
                        *d = r * (*d - m1 - (x - mean) * r * m2);
                    }
                });
        }
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}
