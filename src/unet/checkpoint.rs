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

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, Var,
};

use crate::ops::Handover;

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
        y: Handover::new(y),
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
    /// The forward's result, handed to candle in `fwd`.
    y: Handover,
}

impl<const N: usize> Recompute<N> {
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
        let store = y.apply_op1(Seed::new(grad.detach())?)?.backward()?;
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
    zero: Handover,
}

impl Seed {
    fn new(g: Tensor) -> Result<Self> {
        let zero = Tensor::zeros((), g.dtype(), g.device())?;
        Ok(Self {
            g,
            zero: Handover::new(zero),
        })
    }
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "checkpoint-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.zero.cpu(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.zero.cuda(self.name())
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.g.clone()))
    }
}

impl CustomOp1 for Recompute<1> {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu("checkpoint")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda("checkpoint")
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
        self.y.cpu("checkpoint")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda("checkpoint")
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
        self.y.cpu("checkpoint")
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
        self.y.cuda("checkpoint")
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
