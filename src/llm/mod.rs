//! The LLM half of the encoder: Qwen3 configuration, its tensor schema, our own
//! differentiable Qwen3, and Qwen3 in llama.cpp's GGUF files.

pub mod config;
pub mod gguf;
mod load;
pub mod quantize;
pub mod qwen3;
pub mod schema;

pub use config::Qwen3Config;
pub use qwen3::{GgufOptions, Qwen3};
