//! Adding a frozen bias: the backward passes the gradient through to the input only.
//!
//! candle's `broadcast_add` records the broadcast bias as an operand, and its backward
//! stores a gradient for it (a zero-filled full-size buffer plus an add) that nobody reads
//! and that stays in the `GradStore` until it is dropped: one activation-sized tensor per
//! frozen linear layer.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// `y + b` with `b` `[C]` added along `y`'s last dimension; `b` gets no gradient.
pub fn add_frozen_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let last = y.dims().last().copied();
    if !y.track_op() || !y.device().is_cpu() || b.dims().first().copied() != last || b.rank() != 1 {
        return y.broadcast_add(b);
    }
    y.contiguous()?.apply_op1(FrozenBias {
        b: b.to_dtype(y.dtype())?.contiguous()?.detach(),
    })
}

struct FrozenBias {
    b: Tensor,
}

fn add<T: WithDType>(y: &[T], b: &[T]) -> Vec<T> {
    let n = b.len().max(1);
    let mut out = y.to_vec();
    for row in out.chunks_mut(n) {
        for (v, &b) in row.iter_mut().zip(b) {
            *v += b;
        }
    }
    out
}

impl CustomOp1 for FrozenBias {
    fn name(&self) -> &'static str {
        "frozen-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bs, bl) = self.b.storage_and_layout();
        let candle_core::Storage::Cpu(bs) = &*bs else {
            candle_core::bail!("frozen-bias: bias not on the CPU");
        };
        let (Some((y0, y1)), Some((b0, b1))) = (l.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("frozen-bias: operands must be contiguous");
        };
        let out = match (s, bs) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => {
                CpuStorage::F32(add(&y[y0..y1], &b[b0..b1]))
            }
            (CpuStorage::F64(y), CpuStorage::F64(b)) => {
                CpuStorage::F64(add(&y[y0..y1], &b[b0..b1]))
            }
            (CpuStorage::F16(y), CpuStorage::F16(b)) => {
                CpuStorage::F16(add(&y[y0..y1], &b[b0..b1]))
            }
            (CpuStorage::BF16(y), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(add(&y[y0..y1], &b[b0..b1]))
            }
            _ => candle_core::bail!("frozen-bias: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}
