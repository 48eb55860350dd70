//! `silu(gate) * up`, the SwiGLU feed-forward's middle, as one op with its own backward for
//! f32 CPU tensors: one vectorised pass forward (`vexp`), one backward, instead of candle's
//! scalar-`expf` SiLU, a multiply and their four full-size backward temporaries.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice, vexp};

/// Elements per parallel chunk: large enough to amortise a task, small enough to balance.
const CHUNK: usize = 1 << 14;

/// `silu(gate) * up`. Contiguous-able f32 CPU tensors of one shape take the fused op (with a
/// backward when either is tracked); anything else candle's ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_cpu = |x: &Tensor| x.dtype() == DType::F32 && x.device().is_cpu();
    if f32_cpu(gate) && f32_cpu(up) && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul);
    }
    candle_nn::ops::silu(gate)? * up
}

struct SiluMul;

fn invalid() -> candle_core::Error {
    super::not_cpu_f32("silu-mul")
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (
            f32_slice(sg, lg).ok_or_else(invalid)?,
            f32_slice(su, lu).ok_or_else(invalid)?,
        );
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| vexp::silu_mul(g, u, o));
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let n = gate.elem_count();
        let (mut d_gate, mut d_up) = (vec![0f32; n], vec![0f32; n]);
        {
            let guards = [gate, up, &grad].map(|x| x.storage_and_layout());
            let [Some(g), Some(u), Some(dy)] = guards.each_ref().map(|(s, l)| cpu_f32(s, l)) else {
                return Err(invalid());
            };
            d_gate
                .par_chunks_mut(CHUNK)
                .zip(d_up.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), dy)| vexp::silu_mul_backward(g, u, dy, dg, du));
        }
        let shape = gate.shape();
        let wanted = |t: &Tensor, v: Vec<f32>| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| Tensor::from_vec(v, shape, t.device()))
                .transpose()
        };
        Ok((wanted(gate, d_gate)?, wanted(up, d_up)?))
    }
}
