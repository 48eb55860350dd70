//! Scaled dot-product attention with an additive causal/padding bias and grouped KV heads.
//!
//! Two implementations with one contract. The composed one (matmul, bias add, softmax,
//! matmul; its products on the BLAS when nothing is tracked) runs everywhere and keeps
//! autograd. The fused one is the f32 CPU path when a system BLAS is loaded
//! ([`super::blas`]): per (batch, head, block of queries) it multiplies only the keys a causal
//! query block can see, applies scale, bias and softmax in place on a small scratch buffer
//! with the vectorised `exp`, and writes the result straight into `[B, T, heads * head_dim]`
//! order, so the score tensor, the broadcast bias add and the final transpose copy of the
//! composed version never exist. Its backward (training) recomputes each block's
//! probabilities instead of keeping them, flash-attention style, and runs its four products
//! per block on the BLAS.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::blas::{self, Blas};
use super::{batched_matmul, cpu_f32, f32_slice, softmax, vexp, ForwardMode};

/// Query rows per fused task: small enough to skip most of the masked upper triangle and to
/// give the thread pool enough tasks, large enough for efficient GEMMs.
const QUERY_BLOCK: usize = 64;

/// `q`: `[B, heads, T, hd]`; `k`, `v`: `[B, kv_heads, T, hd]`; `bias`: `[B, 1, 1, T, T]`
/// additive (0 = may attend, [`super::MASKED`] = may not), in the softmax dtype (f32, or f64
/// for an f64 model). Returns `[B, T, heads * hd]` in the dtype of `v`. Rows of queries that
/// may attend nothing are finite and meaningless.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    path: ForwardMode,
) -> Result<Tensor> {
    if let Some(out) = fused_cpu(q, k, v, bias)? {
        return Ok(out);
    }
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let groups = nh / nkv;
    // Grouped-query attention without copying K/V per head: the query heads that share a KV
    // head are stacked along the sequence axis.
    let q = (q.reshape((b, nkv, groups * t, hd))? * (hd as f64).powf(-0.5))?;
    let scores = batched_matmul(&q, k, true)?;
    let scores = scores
        .to_dtype(bias.dtype())?
        .reshape((b, nkv, groups, t, t))?
        .broadcast_add(bias)?;
    let probs = softmax(&scores, path)?
        .to_dtype(v.dtype())?
        .reshape((b, nkv, groups * t, t))?;
    batched_matmul(&probs, v, false)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

fn fused_cpu(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    let Some(blas) = blas::get() else {
        return Ok(None);
    };
    let all_f32 = [q, k, v, bias].iter().all(|x| x.dtype() == DType::F32);
    if !all_f32 || !q.device().is_cpu() {
        return Ok(None);
    }
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    if nkv == 0 || nh % nkv != 0 || k.dims() != [b, nkv, t, hd] || v.dims() != k.dims() {
        return Ok(None);
    }
    if bias.elem_count() != b * t * t || !blas.fits((t, t.max(hd), t.max(hd))) {
        return Ok(None);
    }
    let op = Fused {
        blas,
        bias: bias.contiguous()?.detach(),
        dims: Dims { b, nh, nkv, t, hd },
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
        .map(Some)
}

/// The fused attention as an op: the forward above, and a backward.
struct Fused {
    blas: &'static Blas,
    bias: Tensor,
    dims: Dims,
}

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("attention")
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let Dims { b, nh, t, hd, .. } = self.dims;
        let (sb, lb) = self.bias.storage_and_layout();
        let [Some(qd), Some(kd), Some(vd)] =
            [(sq, lq), (sk, lk), (sv, lv)].map(|(s, l)| f32_slice(s, l))
        else {
            return Err(invalid());
        };
        let bd = cpu_f32(&sb, lb).ok_or_else(invalid)?;
        let len = b * t * nh * hd;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let out_ptr = out.spare_capacity_mut().as_mut_ptr() as *mut f32;
        // SAFETY: `out` has room for `len` floats and `run` writes every one of them (the
        // (batch, head, query block) tasks tile [B, T, heads * hd]); the inputs are the
        // contiguous tensors of the shapes checked in `fused_cpu`.
        unsafe {
            run(self.blas, self.dims, (qd, kd, vd, bd), out_ptr);
            out.set_len(len);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, nh * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let Dims { b, nh, nkv, t, hd } = self.dims;
        let mut dq = vec![0f32; b * nh * t * hd];
        let mut dk = vec![0f32; b * nkv * t * hd];
        let mut dv = vec![0f32; b * nkv * t * hd];
        {
            let guards = [q, k, v, &grad, &self.bias].map(|x| x.storage_and_layout());
            let [Some(qd), Some(kd), Some(vd), Some(gd), Some(bd)] =
                guards.each_ref().map(|(s, l)| cpu_f32(s, l))
            else {
                return Err(invalid());
            };
            backward(
                self.blas,
                self.dims,
                [qd, kd, vd, bd, gd],
                (&mut dq, &mut dk, &mut dv),
            );
        }
        let dev = q.device();
        let wanted = |x: &Tensor, d: Vec<f32>| -> Result<Option<Tensor>> {
            x.track_op()
                .then(|| Tensor::from_vec(d, x.shape(), dev))
                .transpose()
        };
        Ok((wanted(q, dq)?, wanted(k, dk)?, wanted(v, dv)?))
    }
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    hd: usize,
}

/// # Safety
/// `out` must have room for `B * T * heads * hd` floats that nobody else touches meanwhile.
unsafe fn run(
    blas: &Blas,
    d: Dims,
    (q, k, v, bias): (&[f32], &[f32], &[f32], &[f32]),
    out: *mut f32,
) {
    use rayon::prelude::*;
    let Dims { b, nh, nkv, t, hd } = d;
    let groups = nh / nkv;
    let blocks = t.div_ceil(QUERY_BLOCK);
    let out_addr = out as usize;
    (0..b * nh * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / nh, bh % nh);
        let kv = bi * nkv + h / groups;
        let i0 = blk * QUERY_BLOCK;
        let i1 = (i0 + QUERY_BLOCK).min(t);
        let (rows, keys) = (i1 - i0, i1);
        let v_seq = &v[kv * t * hd..(kv * t + keys) * hd];
        let mut s = vec![0f32; rows * keys];
        let mut bias_blk = Vec::with_capacity(rows * keys);
        block_probs(
            blas,
            d,
            (q, k, bias),
            (bh, kv, i0, i1),
            &mut s,
            &mut bias_blk,
        );
        // Output rows i0..i1 of head h in [B, T, heads * hd] order: row stride heads * hd.
        let o = (bi * t + i0) * nh * hd + h * hd;
        // SAFETY: tasks write disjoint (rows, head) blocks of `out`, which outlives the loop.
        unsafe {
            blas.gemm(
                (rows, hd, keys),
                (s.as_ptr(), keys, false),
                (v_seq.as_ptr(), hd, false),
                0.0,
                ((out_addr as *mut f32).add(o), nh * hd),
            );
        }
    });
}

/// The attention probabilities of head `bh`'s queries `i0..i1` over keys `0..i1` of KV head
/// `kv` (causal: later keys carry the mask value and would get exactly zero weight), written
/// to `p` `[i1 - i0, i1]`; `bias_blk` is scratch. The forward and the backward both call this,
/// so the backward differentiates exactly the softmax the forward used.
fn block_probs(
    blas: &Blas,
    d: Dims,
    (q, k, bias): (&[f32], &[f32], &[f32]),
    (bh, kv, i0, i1): (usize, usize, usize, usize),
    p: &mut [f32],
    bias_blk: &mut Vec<f32>,
) {
    let Dims { nh, t, hd, .. } = d;
    let (rows, keys, bi) = (i1 - i0, i1, bh / nh);
    let q_blk = &q[(bh * t + i0) * hd..(bh * t + i1) * hd];
    let k_seq = &k[kv * t * hd..(kv * t + keys) * hd];
    assert_eq!(p.len(), rows * keys);
    bias_blk.clear();
    for i in i0..i1 {
        let r = (bi * t + i) * t;
        bias_blk.extend_from_slice(&bias[r..r + keys]);
    }
    // SAFETY: `q_blk` is [rows, hd], `k_seq` [keys, hd] and `p` [rows, keys] (checked above).
    unsafe {
        blas.gemm(
            (rows, keys, hd),
            (q_blk.as_ptr(), hd, false),
            (k_seq.as_ptr(), hd, true),
            0.0,
            (p.as_mut_ptr(), keys),
        );
    }
    vexp::softmax_rows(p, bias_blk, keys, (hd as f32).powf(-0.5));
}

/// The gradients of `run`'s output with respect to q, k and v, given the output's gradient
/// `g` `[B, T, heads * hd]`. One task per (batch, KV head): it owns that head's `dk`/`dv`
/// rows and the `dq` rows of the query heads that share it, so nothing is written twice.
/// Per query block (the forward's blocks and key ranges, so both see the same softmax):
/// `P` is recomputed, then `dV += P.T dO`, `dP = dO V.T`, `dS = P (dP - rowsum(dP P))`,
/// `dQ = scale dS K`, `dK += scale dS.T Q`.
fn backward(
    blas: &Blas,
    d: Dims,
    [q, k, v, bias, g]: [&[f32]; 5],
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    use rayon::prelude::*;
    let Dims { nh, nkv, t, hd, .. } = d;
    let groups = nh / nkv;
    let scale = (hd as f32).powf(-0.5);
    let blocks = t.div_ceil(QUERY_BLOCK);
    let dq_addr = dq.as_mut_ptr() as usize;
    let row = nh * hd;
    dk.par_chunks_mut(t * hd)
        .zip(dv.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(kv, (dk, dv))| {
            let bi = kv / nkv;
            let k_seq = &k[kv * t * hd..(kv + 1) * t * hd];
            let v_seq = &v[kv * t * hd..(kv + 1) * t * hd];
            let mut p = vec![0f32; QUERY_BLOCK.min(t) * t];
            let mut dp = vec![0f32; QUERY_BLOCK.min(t) * t];
            let mut bias_blk = Vec::with_capacity(QUERY_BLOCK.min(t) * t);
            for h in (kv % nkv) * groups..(kv % nkv + 1) * groups {
                let bh = bi * nh + h;
                for blk in 0..blocks {
                    let i0 = blk * QUERY_BLOCK;
                    let i1 = (i0 + QUERY_BLOCK).min(t);
                    let (rows, keys) = (i1 - i0, i1);
                    let q_blk = q[(bh * t + i0) * hd..].as_ptr();
                    let g_blk = g[(bi * t + i0) * row + h * hd..].as_ptr();
                    let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
                    block_probs(blas, d, (q, k, bias), (bh, kv, i0, i1), p, &mut bias_blk);
                    // SAFETY (all products): the pointers cover the blocks described by the
                    // dimensions and leading dimensions; `p`, `dp`, `dk`, `dv` are this task's
                    // own and its `dq` rows (head h, rows i0..i1) are written by no other task.
                    unsafe {
                        blas.gemm(
                            (rows, keys, hd),
                            (g_blk, row, false),
                            (v_seq.as_ptr(), hd, true),
                            0.0,
                            (dp.as_mut_ptr(), keys),
                        );
                        blas.gemm(
                            (keys, hd, rows),
                            (p.as_ptr(), keys, true),
                            (g_blk, row, false),
                            1.0,
                            (dv.as_mut_ptr(), hd),
                        );
                    }
                    for (dp, p) in dp.chunks_exact_mut(keys).zip(p.chunks_exact(keys)) {
                        let dot: f32 = dp.iter().zip(p.iter()).map(|(a, b)| a * b).sum();
                        for (dp, &p) in dp.iter_mut().zip(p) {
                            *dp = scale * p * (*dp - dot);
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        let dq_blk = (dq_addr as *mut f32).add((bh * t + i0) * hd);
                        blas.gemm(
                            (rows, hd, keys),
                            (dp.as_ptr(), keys, false),
                            (k_seq.as_ptr(), hd, false),
                            0.0,
                            (dq_blk, hd),
                        );
                        blas.gemm(
                            (keys, hd, rows),
                            (dp.as_ptr(), keys, true),
                            (q_blk, hd, false),
                            1.0,
                            (dk.as_mut_ptr(), hd),
                        );
                    }
                }
            }
        });
}
