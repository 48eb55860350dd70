//! qwenclip: an SDXL text encoder made of Qwen3 + a PEFT LoRA + a Perceiver Resampler,
//! distilled from SDXL's CLIP-L/CLIP-G.
//!
//! The module tree follows the data: [`tokenizer`] -> [`llm`] (Qwen3) -> [`lora`] ->
//! [`resampler`] -> [`conditioning`] (the [`Encoder`]); [`adapter`] bundles LoRA + resampler;
//! [`formats`] reads and writes weight files; [`ops`] holds the kernels that differ between
//! the fast and the differentiable path. Distillation: [`teacher`] (SDXL's CLIP-L + CLIP-G)
//! -> [`data`] (captions, target cache) -> [`training`]. Vision-based distillation judges the
//! student with [`unet`] (SDXL's frozen UNet, backpropagated through) along trajectories of
//! [`sampling`] (diffusers' Euler and DDIM).
//!
//! [`allocator`] is the process's global allocator when the default `allocator` feature is on
//! (it keeps freed large blocks for reuse; turn the feature off to bring your own).
//!
//! The C ABI (`qwenclip_*` exports of the `cdylib`, header `include/qwenclip.h`) is not part
//! of the Rust API. With the `dev` feature, `dev` holds the seeded model generators of the
//! tests and benchmarks.

pub mod adapter;
pub mod allocator;
pub mod conditioning;
pub mod data;
#[cfg(feature = "dev")]
pub mod dev;
pub mod error;
pub mod formats;
pub mod hub;
pub mod llm;
pub mod lora;
pub mod ops;
pub mod resampler;
pub mod rng;
pub mod sampling;
pub mod teacher;
pub mod tokenizer;
pub mod training;
pub mod unet;

pub use adapter::Adapter;
pub use conditioning::{Conditioning, Encoder, EncoderOptions};
pub use error::{Error, Result};
pub use llm::qwen3::LoraMode;
pub use ops::ForwardMode;

mod ffi;

#[cfg(feature = "allocator")]
#[global_allocator]
static ALLOCATOR: allocator::Reusing = allocator::Reusing;
