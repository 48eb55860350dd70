//! The C ABI: a thin shell over the safe Rust API. Every export returns a
//! [`qwenclip_status`](boundary::qwenclip_status); failures leave a message for
//! [`qwenclip_last_error`](about::qwenclip_last_error); no panic crosses
//! the boundary; objects are named by handles (ids checked against a registry), so a freed,
//! forged or wrong-kind handle is an error instead of undefined behaviour.
//!
//! Thread rules: every function may be called from any thread. Calls on one encoder may run
//! concurrently (encodes share it read-only; `load_adapter` and `offload` wait for them).
//! Calls on one training run are serialised.
//!
//! Private to the crate: the `#[no_mangle]` exports (header `include/qwenclip.h`) are the
//! interface, reached through the shared library as a host loads it.

mod about;
mod boundary;
mod encoder;
mod registry;
mod run;
