//! GEGLU, `h * gelu(gate)` with `[h | gate]` the two halves of the last dimension (the
//! feed-forward of diffusers' transformer blocks), as one op with its own backward for f32
//! CPU tensors. Composed, it is two `narrow`s (whose backward each pads the gradient back
//! to the full width with zeros), an exact GELU and a multiply: five nodes and three
//! full-size gradient buffers per call; here one pass each way (`vexp`).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice, vexp};

/// Rows per parallel task.
const ROWS: usize = 16;

/// `p[..., :n] * gelu_erf(p[..., n:])` for `p` `[..., 2n]`: `[..., n]`.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let width = p.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: last dimension {width} is odd");
    }
    if p.dtype() == DType::F32 && p.device().is_cpu() {
        return p.contiguous()?.apply_op1(Geglu);
    }
    let n = width / 2;
    let h = p.narrow(D::Minus1, 0, n)?;
    let gate = p.narrow(D::Minus1, n, n)?;
    h * gelu_from_erf(&gate)?
}

/// `x (1 + erf(x / sqrt 2)) / 2` composed from `erf`, whose backward is exact: candle's own
/// `gelu_erf` backward rounds `1/sqrt(2 pi)` to 0.398942 (a 7e-7 relative error that a
/// float64 finite-difference check sees).
fn gelu_from_erf(x: &Tensor) -> Result<Tensor> {
    ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.mul(x)? * 0.5
}

struct Geglu;

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("geglu")
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = f32_slice(s, l).ok_or_else(invalid)?;
        let dims = l.shape().dims();
        let n = dims[dims.len() - 1] / 2;
        let mut y = vec![0f32; p.len() / 2];
        y.par_chunks_mut(ROWS * n.max(1))
            .zip(p.par_chunks(ROWS * 2 * n.max(1)))
            .for_each(|(y, p)| {
                for (y, p) in y.chunks_mut(n.max(1)).zip(p.chunks(2 * n.max(1))) {
                    let (h, gate) = p.split_at(n);
                    vexp::gelu_erf(gate, y);
                    y.iter_mut().zip(h).for_each(|(y, &h)| *y *= h);
                }
            });
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    /// `dh = dy gelu(gate)`, `dgate = dy h gelu'(gate)`.
    fn bwd(&self, p: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let n = p.dim(D::Minus1)? / 2;
        let mut dp = vec![0f32; p.elem_count()];
        {
            let ((sp, lp), (sg, lg)) = (p.storage_and_layout(), grad.storage_and_layout());
            let (ps, gs) = (
                cpu_f32(&sp, lp).ok_or_else(invalid)?,
                cpu_f32(&sg, lg).ok_or_else(invalid)?,
            );
            dp.par_chunks_mut(ROWS * 2 * n.max(1))
                .zip(
                    ps.par_chunks(ROWS * 2 * n.max(1))
                        .zip(gs.par_chunks(ROWS * n.max(1))),
                )
                .for_each(|(dp, (p, g))| {
                    let mut hg = vec![0f32; n];
                    for ((dp, p), g) in dp
                        .chunks_mut(2 * n.max(1))
                        .zip(p.chunks(2 * n.max(1)))
                        .zip(g.chunks(n.max(1)))
                    {
                        let (h, gate) = p.split_at(n);
                        let (dh, dgate) = dp.split_at_mut(n);
                        vexp::gelu_erf(gate, dh);
                        dh.iter_mut().zip(g).for_each(|(d, &g)| *d *= g);
                        hg.iter_mut()
                            .zip(h.iter().zip(g))
                            .for_each(|(v, (&h, &g))| *v = h * g);
                        vexp::gelu_erf_backward(gate, &hg, dgate);
                    }
                });
        }
        Tensor::from_vec(dp, p.shape(), p.device()).map(Some)
    }
}
