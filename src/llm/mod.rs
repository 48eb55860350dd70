//! The LLM half of the encoder: Qwen3 configuration, its tensor schema and our own
//! differentiable Qwen3.

pub mod config;
mod load;
pub mod qwen3;
pub mod schema;

pub use config::Qwen3Config;
pub use qwen3::{GgufOptions, Qwen3};
