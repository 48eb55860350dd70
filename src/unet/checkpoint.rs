//! Recomputation by block (activation checkpointing) for candle's autograd.
//!
//! candle keeps every tensor of the recorded graph alive until the graph is dropped: through
//! a UNet that is every norm, activation, convolution and attention output of every block.
//! [`checkpointed`] runs a block on detached inputs (no graph is recorded inside it) and
//! records one node in its place: a custom op over the block's inputs whose backward runs the
//! block again, this time recording, and backpropagates the incoming gradient through that
//! short-lived graph. The outer graph then holds only the blocks' inputs and outputs; one
//! block's graph exists at a time, during its backward. The cost is a second forward of each
//! block during the backward pass.
//!
//! A block is a function of one to three tensors (the activations, and the time embedding or
//! the text conditioning when they are tracked); its weights are captured, frozen.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, Var,
};

/// A block's forward over its inputs.
pub(crate) type BlockFn<const N: usize> = dyn Fn(&[Tensor; N]) -> Result<Tensor> + Send + Sync;

/// `f(inputs)`; when `enabled` and an input is tracked, recorded as one recomputing node
/// (see the module documentation). Untracked inputs are treated as constants.
pub(crate) fn checkpointed<const N: usize>(
    enabled: bool,
    inputs: [&Tensor; N],
    f: Arc<BlockFn<N>>,
) -> Result<Tensor>
where
    Recompute<N>: Record<N>,
{
    if !enabled || !inputs.iter().any(|t| t.track_op()) {
        return f(&inputs.map(|t| t.clone()));
    }
    let y = f(&inputs.map(|t| t.detach()))?;
    Recompute {
        f,
        y: Mutex::new(Some(y)),
    }
    .record(inputs)
}

/// Records a [`Recompute`] over its `N` inputs (candle has one custom-op trait per arity).
pub(crate) trait Record<const N: usize> {
    fn record(self, inputs: [&Tensor; N]) -> Result<Tensor>;
}

impl Record<1> for Recompute<1> {
    fn record(self, [a]: [&Tensor; 1]) -> Result<Tensor> {
        a.apply_op1(self)
    }
}

impl Record<2> for Recompute<2> {
    fn record(self, [a, b]: [&Tensor; 2]) -> Result<Tensor> {
        a.apply_op2(b, self)
    }
}

impl Record<3> for Recompute<3> {
    fn record(self, [a, b, c]: [&Tensor; 3]) -> Result<Tensor> {
        a.apply_op3(b, c, self)
    }
}

pub(crate) struct Recompute<const N: usize> {
    f: Arc<BlockFn<N>>,
    /// The forward's result, handed to candle in `fwd` (taken, so the op does not keep it).
    y: Mutex<Option<Tensor>>,
}

impl<const N: usize> Recompute<N> {
    fn take(&self) -> Result<Tensor> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint result lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint forward ran twice".into()))?;
        // A fresh buffer of exactly y's elements (y may be a view into a larger one).
        let (storage, layout) = y.storage_and_layout();
        let exact = layout.is_contiguous()
            && layout.start_offset() == 0
            && match &*storage {
                candle_core::Storage::Cpu(s) => cpu_len(s) == y.elem_count(),
                _ => true,
            };
        drop(storage);
        if exact {
            Ok(y)
        } else {
            y.affine(1.0, 0.0)
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, _) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.clone(), y.shape().clone())),
            _ => candle_core::bail!("checkpoint: result on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("checkpoint: result on another device"),
        }
    }

    /// Runs the block again on tracked copies of the inputs and returns the gradients of
    /// `sum(block(inputs) * grad)` for the inputs that are tracked outside.
    fn grads(&self, args: [&Tensor; N], grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        let vars: Vec<Option<Var>> = args
            .iter()
            .map(|a| {
                a.track_op()
                    .then(|| Var::from_tensor(&a.detach()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let inputs: [Tensor; N] = std::array::from_fn(|i| match &vars[i] {
            Some(v) => v.as_tensor().clone(),
            None => args[i].detach(),
        });
        let y = (self.f)(&inputs)?;
        let store = y.apply_op1(Seed { g: grad.detach() })?.backward()?;
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        for (i, v) in vars.iter().enumerate() {
            if let Some(v) = v {
                // candle's backward expects a gradient for every tracked input of the node.
                out[i] = Some(match store.get(v.as_tensor()) {
                    Some(g) => g.clone(),
                    None => v.as_tensor().zeros_like()?,
                });
            }
        }
        Ok(out)
    }
}

/// A scalar whose gradient with respect to its input `y` is `g`: where the recomputed
/// block's backward starts, without a full-size `y * g` and its own backward.
struct Seed {
    g: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "checkpoint-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let zero = Tensor::zeros((), self.g.dtype(), &candle_core::Device::Cpu)?;
        let (storage, _) = zero.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.clone(), Shape::from(()))),
            _ => candle_core::bail!("checkpoint-seed: not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let zero = Tensor::zeros((), self.g.dtype(), self.g.device())?;
        let (storage, layout) = zero.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, Shape::from(()))),
            _ => candle_core::bail!("checkpoint-seed: not on the GPU"),
        }
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.g.clone()))
    }
}

fn cpu_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::U8(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        // Other element types never come out of a UNet block: force a fresh copy.
        #[allow(unreachable_patterns)]
        _ => usize::MAX,
    }
}

impl CustomOp1 for Recompute<1> {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(&self, a: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [ga] = self.grads([a], grad)?;
        Ok(ga)
    }
}

impl CustomOp2 for Recompute<2> {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for Recompute<3> {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], grad)?;
        Ok((ga, gb, gc))
    }
}
