//! The LLM half of the encoder: Qwen3 configuration and our own differentiable Qwen3.

pub mod config;
pub mod qwen3;

pub use config::Qwen3Config;
pub use qwen3::{GgufOptions, Qwen3};
