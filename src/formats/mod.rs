//! Weight files: safetensors (single or sharded), PyTorch `.pth` with a key map, and the
//! atomic writer every saved file goes through.

pub mod pth;
pub mod safetensors;

pub use safetensors::{save_atomic, Weights};
