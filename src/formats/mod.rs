//! Weight files: safetensors (single or sharded), GGUF (quantized Qwen3), PyTorch `.pth`
//! with a key map, and the atomic writer every saved file goes through.

pub mod atomic;
pub mod gguf;
pub mod pth;
pub mod safetensors;

pub use safetensors::{save_atomic, Weights};
