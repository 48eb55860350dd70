//! The ops whose fast candle kernels record no gradient (see `shared/notes/candle.md`), and
//! the CPU kernels that replace candle's composed autograd on the training path. Every model
//! calls these with a [`ForwardMode`]: `Fast` for inference, `Differentiable` for training.
//! `tests/gradients.rs` checks the composed differentiable versions against finite
//! differences, `tests/kernels.rs` the fused f32 CPU ops (forward, backward, which operands
//! get gradients) against those in f64, and `tests/parity.rs` checks both paths agree.
//!
//! On the CPU with a system BLAS ([`blas`]) each training op is a single autograd node with
//! its own backward: candle's backward pays a zero-filled buffer and an add for every
//! gradient of every node, and computes gradients for frozen operands too, which made the
//! composed graph twice as slow as `transformers` + `peft` on a 2-core CPU.

mod attention;
mod bias;
pub mod blas;
mod conv;
mod dispatch;
mod frozen;
mod full_attention;
mod geglu;
mod gelu;
mod group_norm;
mod handover;
mod layer_norm;
mod linear;
mod matmul;
pub mod qgemm;
mod quantized;
mod rms_norm;
mod rope;
mod storage;
mod swiglu;
pub mod vexp;

pub use attention::attention;
pub use bias::add_frozen_bias;
pub use conv::{frozen_conv2d, Conv2dParams};
pub use dispatch::{
    compute_dtype, layer_norm, rms_norm, rope, rope_heads, softmax, ForwardMode, MASKED,
};
pub use frozen::{frozen_linear, frozen_linear_lora, quantized_linear};
pub use full_attention::full_attention;
pub use geglu::geglu;
pub use gelu::gelu_erf;
pub use group_norm::group_norm;
pub(crate) use handover::Handover;
pub use matmul::{batched_matmul, linear, matmul_t};
pub use quantized::{dequantize_from_rows, QMatMulKernel, QMatrix, DEQUANTIZE_CHUNK_BYTES};
pub(crate) use storage::{cpu_f32, f32_slice, f32_slice_mut, not_cpu_f32};
pub use swiglu::silu_mul;
