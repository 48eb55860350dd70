//! Weight files as containers: safetensors (single or sharded), GGUF, PyTorch `.pth` with a
//! key map, and the atomic replacement every saved file goes through. What the tensors mean
//! belongs to the models that read them.

pub mod atomic;
pub mod gguf;
pub mod pth;
pub mod safetensors;

pub use safetensors::{save_atomic, Weights};
