//! Multi-head attention without a mask, where every query sees every key: the UNet's
//! self-attention (queries and keys the same pixels) and cross-attention (keys from the text
//! conditioning, any length). Operands stay in the projections' `[B, T, heads * hd]` layout.
//!
//! Two implementations with one contract. The composed one (split heads, matmul, softmax,
//! matmul, merge heads) runs everywhere with candle's autograd. The fused one is the f32 CPU
//! path with a system BLAS ([`super::blas`]): per (batch, head, block of queries) it
//! multiplies the block with that head's keys (the head's columns read in place through the
//! BLAS leading dimension), takes the softmax on a small scratch buffer with the vectorised
//! `exp`, and writes the result into `[B, Tq, heads * hd]`, so neither the `[B, heads, Tq, Tk]`
//! scores nor any head transpose ever exists. Its backward recomputes each block's
//! probabilities (flash-attention style) instead of keeping them.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::blas::{self, Blas};
use super::{cpu_f32, f32_slice, softmax, vexp, ForwardMode};

/// Query rows per fused task.
const QUERY_BLOCK: usize = 64;

/// `softmax(q_h k_h^T / sqrt(hd)) v_h` for each head `h`, concatenated. `q`: `[B, Tq, C]`,
/// `k`, `v`: `[B, Tk, C]` with `C = heads * hd`. Returns `[B, Tq, C]`.
pub fn full_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    path: ForwardMode,
) -> Result<Tensor> {
    let (b, tq, c) = q.dims3()?;
    let (bk, tk, ck) = k.dims3()?;
    if bk != b || ck != c || v.dims() != k.dims() || heads == 0 || !c.is_multiple_of(heads) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let hd = c / heads;
    if let Some(blas) = blas::get() {
        let f32_cpu = [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
        if f32_cpu && blas.fits((tq.max(tk), tk.max(c), tk.max(c))) && tk > 0 {
            let op = Fused {
                blas,
                dims: Dims {
                    b,
                    heads,
                    tq,
                    tk,
                    hd,
                },
            };
            return q
                .contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
        }
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
    let scores = (qh.matmul(&kh.t()?)? * (hd as f64).powf(-0.5))?;
    let dtype = scores.dtype();
    let probs = softmax(&scores.to_dtype(super::compute_dtype(dtype))?, path)?.to_dtype(dtype)?;
    probs.matmul(&vh)?.transpose(1, 2)?.reshape((b, tq, c))
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    hd: usize,
}

impl Dims {
    fn width(&self) -> usize {
        self.heads * self.hd
    }
}

struct Fused {
    blas: &'static Blas,
    dims: Dims,
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("full-attention")
}

/// `p = softmax(q_blk k_h^T * scale)` for query rows `i0..i1` of batch `bi`, head `h`;
/// `p` is `[i1 - i0, Tk]`. The forward and the backward both call this.
fn block_probs(
    blas: &Blas,
    d: Dims,
    (q, k): (&[f32], &[f32]),
    (bi, h, i0, i1): (usize, usize, usize, usize),
    p: &mut [f32],
) {
    let Dims { tq, tk, hd, .. } = d;
    let c = d.width();
    let rows = i1 - i0;
    let q_blk = &q[(bi * tq + i0) * c + h * hd..];
    let k_h = &k[bi * tk * c + h * hd..];
    debug_assert_eq!(p.len(), rows * tk);
    // SAFETY: q's block is rows x hd with row stride c, k's head is tk x hd with row stride
    // c (both inside their slices), p is rows x tk.
    unsafe {
        blas.gemm(
            (rows, tk, hd),
            (q_blk.as_ptr(), c, false),
            (k_h.as_ptr(), c, true),
            0.0,
            (p.as_mut_ptr(), tk),
        );
    }
    let scale = (hd as f32).powf(-0.5);
    for row in p.chunks_exact_mut(tk) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
        row.iter_mut().for_each(|v| *v = *v * scale - max);
        vexp::exp_in_place(row);
        let inv = 1.0 / row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "full-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [Some(q), Some(k), Some(v)] =
            [(sq, lq), (sk, lk), (sv, lv)].map(|(s, l)| f32_slice(s, l))
        else {
            return Err(invalid());
        };
        let d = self.dims;
        let Dims {
            b,
            heads,
            tq,
            tk,
            hd,
        } = d;
        let c = d.width();
        let blocks = tq.div_ceil(QUERY_BLOCK);
        let len = b * tq * c;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let out_addr = out.spare_capacity_mut().as_mut_ptr() as usize;
        (0..b * heads * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let i0 = blk * QUERY_BLOCK;
            let i1 = (i0 + QUERY_BLOCK).min(tq);
            let mut p = vec![0f32; (i1 - i0) * tk];
            block_probs(self.blas, d, (q, k), (bi, h, i0, i1), &mut p);
            let v_h = &v[bi * tk * c + h * hd..];
            // SAFETY: tasks write disjoint (rows, head) blocks of `out` (row stride c), which
            // has capacity for all of them; v's head is tk x hd with row stride c.
            unsafe {
                self.blas.gemm(
                    (i1 - i0, hd, tk),
                    (p.as_ptr(), tk, false),
                    (v_h.as_ptr(), c, false),
                    0.0,
                    ((out_addr as *mut f32).add((bi * tq + i0) * c + h * hd), c),
                );
            }
        });
        // SAFETY: the tasks tile [B, Tq, C]: every element was written.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((b, tq, c))))
    }

    /// One task per (batch, head): it owns that head's columns of `dq`, `dk` and `dv`. Per
    /// query block, with `P` recomputed: `dV += P^T dO`, `dP = dO V^T`,
    /// `dS = P (dP - rowsum(dP P)) scale`, `dQ = dS K`, `dK += dS^T Q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d = self.dims;
        let Dims {
            b,
            heads,
            tq,
            tk,
            hd,
        } = d;
        let c = d.width();
        let mut dq = vec![0f32; b * tq * c];
        let mut dk = vec![0f32; b * tk * c];
        let mut dv = vec![0f32; b * tk * c];
        {
            let guards = [q, k, v, &grad].map(|t| t.storage_and_layout());
            let [Some(qs), Some(ks), Some(vs), Some(gs)] =
                guards.each_ref().map(|(s, l)| cpu_f32(s, l))
            else {
                return Err(invalid());
            };
            let addr = [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()].map(|p| p as usize);
            let scale = (hd as f32).powf(-0.5);
            (0..b * heads).into_par_iter().for_each(|bh| {
                let (bi, h) = (bh / heads, bh % heads);
                let rows_max = QUERY_BLOCK.min(tq);
                let mut p = vec![0f32; rows_max * tk];
                let mut dp = vec![0f32; rows_max * tk];
                let head =
                    |t: &[f32], len: usize, i0: usize| t[(bi * len + i0) * c + h * hd..].as_ptr();
                let head_mut = |a: usize, len: usize, i0: usize| {
                    (a as *mut f32).wrapping_add((bi * len + i0) * c + h * hd)
                };
                for i0 in (0..tq).step_by(QUERY_BLOCK) {
                    let i1 = (i0 + QUERY_BLOCK).min(tq);
                    let rows = i1 - i0;
                    let (p, dp) = (&mut p[..rows * tk], &mut dp[..rows * tk]);
                    block_probs(self.blas, d, (qs, ks), (bi, h, i0, i1), p);
                    let g_blk = head(gs, tq, i0);
                    // SAFETY (all products): operands are (rows | tk) x hd blocks with row
                    // stride c inside their buffers, or this task's rows x tk scratch; the
                    // head-h columns of dq, dk, dv for batch bi are written by this task only.
                    unsafe {
                        self.blas.gemm(
                            (rows, tk, hd),
                            (g_blk, c, false),
                            (head(vs, tk, 0), c, true),
                            0.0,
                            (dp.as_mut_ptr(), tk),
                        );
                        self.blas.gemm(
                            (tk, hd, rows),
                            (p.as_ptr(), tk, true),
                            (g_blk, c, false),
                            1.0,
                            (head_mut(addr[2], tk, 0), c),
                        );
                    }
                    for (dp, p) in dp.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
                        let dot: f32 = dp.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
                        for (dp, &p) in dp.iter_mut().zip(p) {
                            *dp = scale * p * (*dp - dot);
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        self.blas.gemm(
                            (rows, hd, tk),
                            (dp.as_ptr(), tk, false),
                            (head(ks, tk, 0), c, false),
                            0.0,
                            (head_mut(addr[0], tq, i0), c),
                        );
                        self.blas.gemm(
                            (tk, hd, rows),
                            (dp.as_ptr(), tk, true),
                            (head(qs, tq, i0), c, false),
                            1.0,
                            (head_mut(addr[1], tk, 0), c),
                        );
                    }
                }
            });
        }
        let wanted = |t: &Tensor, g: Vec<f32>| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| Tensor::from_vec(g, t.shape(), t.device()))
                .transpose()
        };
        Ok((wanted(q, dq)?, wanted(k, dk)?, wanted(v, dv)?))
    }
}
