//! Views of tensor storage as f32 slices, for the CPU kernels that work on slices.

use candle_core::{CpuStorage, Layout, Storage};

/// The error of a CPU kernel given an operand that is not contiguous f32 on the CPU (its
/// callers check first, so this means a bug, named by the op).
pub(crate) fn not_cpu_f32(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: operands must be contiguous f32 on the CPU"))
}

/// The f32 elements of a contiguous CPU tensor's storage, or `None` (another device, dtype
/// or a strided layout). For the CPU kernels that work on slices.
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match s {
        Storage::Cpu(c) => f32_slice(c, l),
        _ => None,
    }
}

/// [`cpu_f32`] for a CPU storage (what in-place ops receive).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

/// [`f32_slice`], mutable.
pub(crate) fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Option<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Some(&mut v[a..b]),
        _ => None,
    }
}
