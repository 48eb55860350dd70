//! GGUF, llama.cpp's single-file format, as a container: metadata, a tensor directory and
//! tensor data, quantized blocks kept as they are. What the tensors and keys mean for a
//! model lives with that model (`llm::gguf` for Qwen3, `tokenizer::gguf` for the vocabulary).

mod read;
mod types;
mod write;

use std::path::Path;

pub use read::{GgufFile, TensorEntry, TensorReader};
pub use types::{file_type, ggml_type_name, is_float, parse_type, type_name};
pub use write::{storable_type, GgufWriter};

/// True when `path` names a GGUF file (by extension: that is how `--model` dispatches; a
/// folder whose name ends in `.gguf` is still a folder).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}
