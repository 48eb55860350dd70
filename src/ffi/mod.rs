//! The C ABI: a thin shell over the safe Rust API. Every export returns a
//! [`qwenclip_status`]; failures leave a message for [`qwenclip_last_error`]; no panic crosses
//! the boundary; objects are named by handles (ids checked against a registry), so a freed,
//! forged or wrong-kind handle is an error instead of undefined behaviour.
//!
//! Thread rules: every function may be called from any thread. Calls on one encoder may run
//! concurrently (encodes share it read-only; `load_adapter` and `offload` wait for them).
//! Calls on one trainer are serialised.

mod boundary;
pub mod encoder;
mod registry;
mod run;

pub use boundary::qwenclip_status;
pub use encoder::EncoderSpec;

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
    boundary::call(|| {
        let out = boundary::out_ptr(out, "out")?;
        let mut m = qwenclip_memory::default();
        for (bytes, cuda) in encoder::held_bytes().into_iter().chain(run::held_bytes()) {
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
/// adapter). Training runs keep their state. Use it when the host needs the memory back.
#[no_mangle]
pub extern "C" fn qwenclip_release_memory() -> qwenclip_status {
    boundary::call(encoder::offload_all)
}
