//! Developer tools, compiled only with the `dev` feature (the `qwenclip-dev` command, the
//! tests and the benchmarks use them; the `qwenclip` command and the shared library do not).

pub mod tiny;

/// Qwen3's `tokenizer.json` (`tests/fixtures/tokenizers/qwen_tokenizer.json`, 5.2 MB), built
/// in so that the generators work from an installed `qwenclip-dev`, away from the source tree.
pub static QWEN_TOKENIZER: &[u8] =
    include_bytes!("../../tests/fixtures/tokenizers/qwen_tokenizer.json");
