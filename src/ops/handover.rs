//! The forward result of a custom op whose product is computed eagerly with ordinary ops
//! (only its backward rule is custom): held until candle asks for it in `fwd`, then taken, so
//! the op does not keep a second copy alive in the graph.

use std::sync::Mutex;

use candle_core::{CpuStorage, Result, Shape, Storage, Tensor};

pub(crate) struct Handover(Mutex<Option<Tensor>>);

impl Handover {
    pub(crate) fn new(y: Tensor) -> Self {
        Self(Mutex::new(Some(y)))
    }

    /// The result as one buffer of exactly its elements (it may be a view into a larger or
    /// strided one: then a contiguous copy). `op` names the op in errors.
    fn take(&self, op: &str) -> Result<Tensor> {
        let y = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{op}: result lock poisoned")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward ran twice")))?;
        let (storage, layout) = y.storage_and_layout();
        let exact = layout.is_contiguous()
            && layout.start_offset() == 0
            && match &*storage {
                Storage::Cpu(s) => cpu_len(s) == y.elem_count(),
                _ => true,
            };
        drop(storage);
        if exact {
            Ok(y)
        } else {
            y.affine(1.0, 0.0)
        }
    }

    /// What `cpu_fwd` returns.
    pub(crate) fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        let y = self.take(op)?;
        let (storage, _) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.clone(), y.shape().clone())),
            _ => candle_core::bail!("{op}: result on another device"),
        }
    }

    /// What `cuda_fwd` returns.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take(op)?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("{op}: result on another device"),
        }
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
        // Other element types: force a fresh copy.
        #[allow(unreachable_patterns)]
        _ => usize::MAX,
    }
}
