//! The C ABI: a thin shell over the safe Rust API. Every export returns a
//! [`qwenclip_status`]; failures leave a message for [`qwenclip_last_error`]; no panic crosses
//! the boundary; objects are named by handles (ids checked against a registry), so a freed,
//! forged or wrong-kind handle is an error instead of undefined behaviour.
//!
//! Thread rules: every function may be called from any thread. Calls on one encoder may run
//! concurrently (encodes share it read-only; `load_adapter` and `offload` wait for them).
//! Calls on one training run are serialised.

mod about;
mod boundary;
pub mod encoder;
mod registry;
mod run;

pub use about::{qwenclip_memory, qwenclip_memory_report, qwenclip_release_memory};
pub use boundary::qwenclip_status;
pub use encoder::EncoderSpec;
