//! `x @ w.T` on the system BLAS with autograd, three ways: both operands trainable (LoRA's
//! factors, the resampler), a frozen weight (input gradient only), and a frozen weight with
//! an unmerged LoRA, `x @ w.T + s (x @ a.T) @ b.T`, as one op.
//!
//! candle's `matmul` records the product, but its backward runs on candle's GEMM, through
//! transposed copies, and computes a gradient for the frozen weight too. Composing the LoRA
//! path (two products, two reshapes, a scale and an add) recorded seven nodes per projection,
//! each of which candle's backward pays for with a zero-filled gradient buffer and an add.
//! Here each is one node: the forward is the BLAS products written into one buffer, the
//! backward the products for exactly the operands that are tracked. `x` may have any rank
//! `[..., in]` (its leading dimensions are rows).

use candle_core::Tensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use rayon::prelude::*;

use super::blas::{self, Addend, Blas};
use super::{cpu_f32, f32_slice};

/// The ops apply to f32 CPU operands (`x` `[..., in]`, each weight 2-D) when a BLAS is
/// loaded and can describe the products.
pub fn applies(x: &Tensor, weights: &[&Tensor]) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let Some(blas) = blas::get() else {
        return false;
    };
    let Some(&inp) = x.dims().last() else {
        return false;
    };
    let rows = x.elem_count() / inp.max(1);
    x.rank() >= 2
        && f32_cpu(x)
        && weights.iter().all(|w| {
            w.rank() == 2 && f32_cpu(w) && w.dims().iter().all(|&d| blas.fits((rows, d, d)))
        })
        && blas.fits((rows, inp, inp))
}

/// `x @ w.T`, both trainable. Callers check [`applies`] and `x`'s last dimension.
pub fn trainable(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// `x @ w.T + b`, all trainable (`b` `[out]`). Callers check [`applies`] (with `b` among the
/// weights' devices and dtype) and the shapes.
pub fn trainable_with_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)
}

/// `x @ w.T` for a frozen `w`: the backward returns the input gradient only.
pub fn frozen(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Frozen {
        w: w.contiguous()?.detach(),
    })
}

/// `x @ w.T + scale (x @ a.T) @ b.T` for a frozen `w` (`[out, in]`) and trainable LoRA
/// factors `a` `[r, in]`, `b` `[out, r]`.
pub fn frozen_with_lora(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?.detach(),
            scale: scale as f32,
        },
    )
}

fn blas_or_err() -> Result<&'static Blas> {
    blas::get().ok_or_else(|| candle_core::Error::Msg("linear: no BLAS loaded".into()))
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("linear")
}

/// Runs `f` on the f32 elements of contiguous CPU tensors.
fn with_slices<R, const N: usize>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let slices = guards.each_ref().map(|(s, l)| cpu_f32(s, l));
    if slices.iter().any(Option::is_none) {
        return Err(invalid());
    }
    Ok(f(slices.map(|s| s.expect("checked above"))))
}

/// `(rows, in)` of `x` `[..., in]`.
fn rows_in(shape: &Shape) -> (usize, usize) {
    let inp = *shape.dims().last().unwrap_or(&0);
    (shape.elem_count() / inp.max(1), inp)
}

/// `shape` with its last dimension replaced.
fn with_last(shape: &Shape, last: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

/// `op(a) @ op(b)` as a new `[m, n]` tensor (split over the cores).
fn product(
    (m, n, k): (usize, usize, usize),
    (a, ta): (&[f32], bool),
    (b, tb): (&[f32], bool),
) -> Result<Vec<f32>> {
    Ok(blas_or_err()?.product(1, (m, n, k), (a, ta), (b, tb)))
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())
}

struct Linear;

/// `x @ w.T` `[rows, out]` from the operands' storage.
fn linear_fwd(
    (sx, lx): (&CpuStorage, &Layout),
    (sw, lw): (&CpuStorage, &Layout),
) -> Result<(Vec<f32>, Shape)> {
    let (x, w) = (
        f32_slice(sx, lx).ok_or_else(invalid)?,
        f32_slice(sw, lw).ok_or_else(invalid)?,
    );
    let (rows, inp) = rows_in(lx.shape());
    let out = lw.shape().dims2()?.0;
    let y = product((rows, out, inp), (x, false), (w, true))?;
    Ok((y, with_last(lx.shape(), out)))
}

/// `(dx, dw)` of `x @ w.T` for whichever of `x`, `w` is tracked.
fn linear_bwd(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (rows, inp) = rows_in(x.shape());
    let out = w.dim(0)?;
    with_slices([x, w, g], |[xs, ws, gs]| {
        let dx = x
            .track_op()
            .then(|| product((rows, inp, out), (gs, false), (ws, false)))
            .transpose()?
            .map(|v| tensor(v, x.shape(), x))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| product((out, inp, rows), (gs, true), (xs, false)))
            .transpose()?
            .map(|v| tensor(v, (out, inp), w))
            .transpose()?;
        Ok((dx, dw))
    })?
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
        let (y, shape) = linear_fwd((sx, lx), (sw, lw))?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        linear_bwd(x, w, &g.contiguous()?)
    }
}

/// [`Linear`] plus a bias `[out]` added to every row; its gradient is the column sums of
/// the output gradient.
struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "blas-linear-bias"
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
        let (mut y, shape) = linear_fwd((sx, lx), (sw, lw))?;
        let b = f32_slice(sb, lb).ok_or_else(invalid)?;
        y.par_chunks_mut(b.len().max(1)).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
        });
        Ok((CpuStorage::F32(y), shape))
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
        let (dx, dw) = linear_bwd(x, w, &g)?;
        let out = b.elem_count().max(1);
        let db = if b.track_op() {
            let mut db = vec![0f32; out];
            with_slices([&g], |[gs]| {
                db.par_chunks_mut(BIAS_COLUMNS)
                    .enumerate()
                    .for_each(|(blk, db)| {
                        let c0 = blk * BIAS_COLUMNS;
                        for row in gs.chunks(out) {
                            let row = &row[c0..c0 + db.len()];
                            db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
                        }
                    })
            })?;
            Some(tensor(db, b.shape(), b)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Columns per task of the bias gradient (a sum over rows).
const BIAS_COLUMNS: usize = 256;

struct Frozen {
    w: Tensor,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "blas-frozen-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx).ok_or_else(invalid)?;
        let (rows, inp) = rows_in(lx.shape());
        let out = self.w.dim(0)?;
        let y = with_slices([&self.w], |[w]| {
            product((rows, out, inp), (x, false), (w, true))
        })??;
        Ok((CpuStorage::F32(y), with_last(lx.shape(), out)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (rows, inp) = rows_in(x.shape());
        let out = self.w.dim(0)?;
        let g = g.contiguous()?;
        let dx = with_slices([&g, &self.w], |[gs, ws]| {
            product((rows, inp, out), (gs, false), (ws, false))
        })??;
        tensor(dx, x.shape(), x).map(Some)
    }
}

struct LoraLinear {
    w: Tensor,
    scale: f32,
}

impl LoraLinear {
    /// `scale (x @ a.T)` `[rows, r]`: the LoRA's hidden activations, recomputed in the
    /// backward rather than kept (rank-r, cheap).
    fn hidden(
        &self,
        x: &[f32],
        a: &[f32],
        (rows, inp, r): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut h = product((rows, r, inp), (x, false), (a, true))?;
        h.iter_mut().for_each(|v| *v *= self.scale);
        Ok(h)
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "blas-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [Some(x), Some(a), Some(b)] =
            [(sx, lx), (sa, la), (sb, lb)].map(|(s, l)| f32_slice(s, l))
        else {
            return Err(invalid());
        };
        let (rows, inp) = rows_in(lx.shape());
        let (out, r) = lb.shape().dims2()?;
        let h = self.hidden(x, a, (rows, inp, r))?;
        let lora = Addend {
            k: r,
            a: &h,
            b,
            b_transposed: true,
        };
        let blas = blas_or_err()?;
        let y = with_slices([&self.w], |[w]| {
            blas.product_plus((rows, out, inp), (x, false), (w, true), lora)
        })?;
        Ok((CpuStorage::F32(y), with_last(lx.shape(), out)))
    }

    /// With `h = s x a.T` and `gb = s g b`: `db = g.T h`, `da = gb.T x`, `dx = g w + gb a`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = rows_in(x.shape());
        let (out, r) = b.dims2()?;
        let g = g.contiguous()?;
        with_slices([x, a, b, &g, &self.w], |[xs, as_, bs, gs, ws]| {
            let mut gb = product((rows, r, out), (gs, false), (bs, false))?;
            gb.iter_mut().for_each(|v| *v *= self.scale);
            let db = if b.track_op() {
                let h = self.hidden(xs, as_, (rows, inp, r))?;
                Some(tensor(
                    product((out, r, rows), (gs, true), (&h, false))?,
                    (out, r),
                    b,
                )?)
            } else {
                None
            };
            let da = if a.track_op() {
                Some(tensor(
                    product((r, inp, rows), (&gb, true), (xs, false))?,
                    (r, inp),
                    a,
                )?)
            } else {
                None
            };
            let dx = if x.track_op() {
                let lora = Addend {
                    k: r,
                    a: &gb,
                    b: as_,
                    b_transposed: false,
                };
                let dx =
                    blas_or_err()?.product_plus((rows, inp, out), (gs, false), (ws, false), lora);
                Some(tensor(dx, x.shape(), x)?)
            } else {
                None
            };
            Ok((dx, da, db))
        })?
    }
}
