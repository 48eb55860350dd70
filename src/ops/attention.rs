//! Scaled dot-product attention with an additive causal/padding bias and grouped KV heads.
//!
//! Two implementations with one contract. The composed one (matmul, bias add, softmax,
//! matmul; its products on the BLAS when nothing is tracked) runs everywhere and keeps
//! autograd. The fused one is the CPU inference path when a system BLAS is loaded
//! ([`super::blas`]): per (batch, head, block of queries) it multiplies only the keys a causal
//! query block can see, applies scale, bias and softmax in place on a small scratch buffer
//! with the vectorised `exp`, and writes the result straight into `[B, T, heads * head_dim]`
//! order, so the score tensor, the broadcast bias add and the final transpose copy of the
//! composed version never exist.

use candle_core::{DType, Result, Tensor};

use super::blas::{self, Blas};
use super::{batched_matmul, cpu_f32, softmax, vexp, Path};

/// Query rows per fused task: small enough to skip most of the masked upper triangle and to
/// give the thread pool enough tasks, large enough for efficient GEMMs.
const QUERY_BLOCK: usize = 64;

/// `q`: `[B, heads, T, hd]`; `k`, `v`: `[B, kv_heads, T, hd]`; `bias`: `[B, 1, 1, T, T]`
/// additive (0 = may attend, [`super::MASKED`] = may not), in the softmax dtype (f32, or f64
/// for an f64 model). Returns `[B, T, heads * hd]` in the dtype of `v`. Rows of queries that
/// may attend nothing are finite and meaningless.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, path: Path) -> Result<Tensor> {
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
    let tracked = [q, k, v].iter().any(|x| x.track_op());
    if !all_f32 || tracked || !q.device().is_cpu() {
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
    let (q, k, v, bias) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        bias.contiguous()?,
    );
    let len = b * t * nh * hd;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    {
        let guards = [&q, &k, &v, &bias].map(|x| x.storage_and_layout());
        let [Some(qd), Some(kd), Some(vd), Some(bd)] =
            guards.each_ref().map(|(s, l)| cpu_f32(s, l))
        else {
            return Ok(None);
        };
        let dims = Dims { b, nh, nkv, t, hd };
        let out_ptr = out.spare_capacity_mut().as_mut_ptr() as *mut f32;
        // SAFETY: `out` has room for `len` floats and `run` writes every one of them (the
        // (batch, head, query block) tasks tile [B, T, heads * hd]); the inputs are the
        // contiguous tensors of the shapes checked above.
        unsafe {
            run(blas, dims, (qd, kd, vd, bd), out_ptr);
            out.set_len(len);
        }
    }
    Tensor::from_vec(out, (b, t, nh * hd), q.device()).map(Some)
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
    let scale = (hd as f32).powf(-0.5);
    let blocks = t.div_ceil(QUERY_BLOCK);
    let out_addr = out as usize;
    (0..b * nh * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, h) = (bh / nh, bh % nh);
        let kv = bi * nkv + h / groups;
        let i0 = blk * QUERY_BLOCK;
        let i1 = (i0 + QUERY_BLOCK).min(t);
        let rows = i1 - i0;
        // Causal: queries i0..i1 see keys 0..i1 at most; later keys carry the mask value and
        // would get exactly zero weight in the unfused softmax.
        let keys = i1;
        let q_blk = &q[(bh * t + i0) * hd..(bh * t + i1) * hd];
        let k_seq = &k[kv * t * hd..(kv * t + keys) * hd];
        let v_seq = &v[kv * t * hd..(kv * t + keys) * hd];
        let mut s = vec![0f32; rows * keys];
        let mut bias_blk = Vec::with_capacity(rows * keys);
        for i in i0..i1 {
            let row = (bi * t + i) * t;
            bias_blk.extend_from_slice(&bias[row..row + keys]);
        }
        // SAFETY: the slices above cover the matrices described; `s` is this task's own.
        unsafe {
            blas.raw(
                (rows, keys, hd),
                q_blk.as_ptr(),
                k_seq.as_ptr(),
                hd,
                true,
                s.as_mut_ptr(),
                keys,
            );
        }
        vexp::softmax_rows(&mut s, &bias_blk, keys, scale);
        // Output rows i0..i1 of head h in [B, T, heads * hd] order: row stride heads * hd.
        let o = (bi * t + i0) * nh * hd + h * hd;
        // SAFETY: tasks write disjoint (rows, head) blocks of `out`, which outlives the loop.
        unsafe {
            blas.raw(
                (rows, hd, keys),
                s.as_ptr(),
                v_seq.as_ptr(),
                hd,
                false,
                (out_addr as *mut f32).add(o),
                nh * hd,
            );
        }
    });
}
