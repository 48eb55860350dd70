//! The exports about the library as a whole: its version and features, the last error, and
//! the memory every live handle holds.

use std::ffi::c_char;

use super::boundary::{call, last_error, last_warning, out_ptr, qwenclip_status};

/// Version of this C interface; bumped on any incompatible change.
pub const QWENCLIP_ABI_VERSION: u32 = 2;
/// `qwenclip_capabilities()` bit: the CPU path (always set).
pub const QWENCLIP_CAP_CPU: u32 = 1;
/// `qwenclip_capabilities()` bit: built with CUDA.
pub const QWENCLIP_CAP_CUDA: u32 = 2;

/// Bytes of weights and training state held by live handles, per device.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct qwenclip_memory {
    pub cpu_bytes: u64,
    pub cuda_bytes: u64,
}

/// Reports the bytes held by every live encoder and training run.
///
/// `out` must point to a `qwenclip_memory` the caller owns.
#[no_mangle]
pub extern "C" fn qwenclip_memory_report(out: *mut qwenclip_memory) -> qwenclip_status {
    call(|| {
        let out = out_ptr(out, "out")?;
        let mut m = qwenclip_memory::default();
        for (bytes, cuda) in super::encoder::held_bytes()
            .into_iter()
            .chain(super::run::held_bytes())
        {
            if cuda {
                m.cuda_bytes += bytes as u64;
            } else {
                m.cpu_bytes += bytes as u64;
            }
        }
        *out = m;
        Ok(())
    })
}

/// Releases the weights of every encoder (they reload on their next encode, with the same
/// adapter) and the freed blocks the library keeps for reuse (freeing a run or an encoder
/// returns those too). Training runs keep their state. Use it when the host needs the
/// memory back.
#[no_mangle]
pub extern "C" fn qwenclip_release_memory() -> qwenclip_status {
    call(super::encoder::offload_all)
}

/// The message of the last failed call on this thread ("" after a success). The pointer
/// stays valid until the next qwenclip call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn qwenclip_last_error() -> *const c_char {
    last_error()
}

/// The warnings of the last call on this thread, one per line ("" when there were none), such
/// as prompts cut at the token limit by `qwenclip_encode`. The pointer stays valid until the
/// next qwenclip call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn qwenclip_last_warning() -> *const c_char {
    last_warning()
}

/// The library version as a static NUL-terminated string (never freed).
#[no_mangle]
pub extern "C" fn qwenclip_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The C interface version (`QWENCLIP_ABI_VERSION`); a host should refuse a library whose major
/// interface differs from the header it was built with.
#[no_mangle]
pub extern "C" fn qwenclip_abi_version() -> u32 {
    QWENCLIP_ABI_VERSION
}

/// Compiled features: `QWENCLIP_CAP_CPU` | `QWENCLIP_CAP_CUDA`.
#[no_mangle]
pub extern "C" fn qwenclip_capabilities() -> u32 {
    QWENCLIP_CAP_CPU
        | if cfg!(feature = "cuda") {
            QWENCLIP_CAP_CUDA
        } else {
            0
        }
}
