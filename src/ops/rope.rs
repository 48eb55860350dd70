//! Rotary embedding fused with the `[B, T, H, D]` -> `[B, H, T, D]` transpose, with its own
//! backward, for f32 CPU tensors.
//!
//! The composed differentiable rope (`rope_slow`: narrow, negate, concatenate, two broadcast
//! multiplies, an add) records seven nodes per call, each allocating a full-size tensor
//! forward and backward, plus the transposed copy attention needs. Rotation is orthogonal,
//! so the backward is the same pass with `sin` negated and the transpose undone.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice};

/// The op applies to f32 CPU `x` `[B, T, H, D]` (D even) and `cos`, `sin` `[T, D/2]`.
pub fn applies(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    match x.dims() {
        &[_, t, _, d] => {
            d % 2 == 0
                && [x, cos, sin].into_iter().all(f32_cpu)
                && cos.dims() == [t, d / 2]
                && sin.dims() == [t, d / 2]
        }
        _ => false,
    }
}

/// `x` `[B, T, H, D]` -> rotated `[B, H, T, D]`. Callers check [`applies`].
pub fn to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Which way a pass goes: rotate into head-major order, or (backward) rotate back by the
/// opposite angle into token-major order.
#[derive(Clone, Copy, PartialEq)]
enum Direction {
    ToHeads,
    FromHeads,
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("rope")
}

impl Rope {
    /// One pass over `src` (`[B, T, H, D]` for `ToHeads`, `[B, H, T, D]` for `FromHeads`).
    fn pass(
        &self,
        src: &[f32],
        (t, h, d): (usize, usize, usize),
        dir: Direction,
    ) -> Result<Vec<f32>> {
        let ((sc, lc), (ss, ls)) = (self.cos.storage_and_layout(), self.sin.storage_and_layout());
        let (cos, sin) = (
            cpu_f32(&sc, lc).ok_or_else(invalid)?,
            cpu_f32(&ss, ls).ok_or_else(invalid)?,
        );
        let half = d / 2;
        // Backward: the transpose of a rotation by theta is the rotation by -theta.
        let sign = if dir == Direction::ToHeads { 1.0 } else { -1.0 };
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(d)
            .enumerate()
            .with_min_len(64)
            .for_each(|(r, o)| {
                // `r` indexes destination rows; find the token, head and source row.
                let (tok, s) = match dir {
                    Direction::ToHeads => {
                        let (bi, head, tok) = (r / (h * t), (r / t) % h, r % t);
                        (tok, ((bi * t + tok) * h + head) * d)
                    }
                    Direction::FromHeads => {
                        let (bi, tok, head) = (r / (t * h), (r / h) % t, r % h);
                        (tok, ((bi * h + head) * t + tok) * d)
                    }
                };
                let x = &src[s..s + d];
                let (c, sn) = (&cos[tok * half..][..half], &sin[tok * half..][..half]);
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for i in 0..half {
                    let si = sign * sn[i];
                    o1[i] = x1[i] * c[i] - x2[i] * si;
                    o2[i] = x2[i] * c[i] + x1[i] * si;
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-to-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l).ok_or_else(invalid)?;
        let (b, t, h, d) = l.shape().dims4()?;
        let y = self.pass(x, (t, h, d), Direction::ToHeads)?;
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, h, d) = x.dims4()?;
        let g = g.contiguous()?;
        let dx = {
            let (sg, lg) = g.storage_and_layout();
            self.pass(
                cpu_f32(&sg, lg).ok_or_else(invalid)?,
                (t, h, d),
                Direction::FromHeads,
            )?
        };
        Tensor::from_vec(dx, (b, t, h, d), x.device()).map(Some)
    }
}
