//! Writing a Qwen3 as a llama.cpp GGUF: `qwenclip quantize` (a Hugging Face folder) and the
//! random benchmark models, with the type policy both use.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::config::Qwen3Config;
use super::schema::{self, Group};
use crate::error::{Error, Result};
use crate::formats::gguf::{file_type, GgufWriter};
use crate::formats::Weights;

/// What `qwenclip quantize` and the random GGUF generator store.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeSpec {
    /// Decoder projections.
    pub linear: GgmlDType,
    /// `token_embd` (and `output` for untied models).
    pub embedding: GgmlDType,
}

impl QuantizeSpec {
    /// The type asked for a tensor: norms (and any vector) stay F32, llama.cpp's choice.
    pub fn type_for(&self, gguf_name: &str, shape: &[usize]) -> GgmlDType {
        match schema::parse_gguf(gguf_name).map(|(p, _)| p.group()) {
            _ if shape.len() < 2 => GgmlDType::F32,
            Some(Group::Norms) => GgmlDType::F32,
            Some(Group::Embeddings) => self.embedding,
            _ => self.linear,
        }
    }
}

/// Accumulates quantized tensors and writes a Qwen3 GGUF with llama.cpp's metadata.
pub struct GgufBuilder {
    spec: QuantizeSpec,
    file: GgufWriter,
    /// How many tensors were stored in another type than asked (rows not a whole block).
    pub fallbacks: usize,
}

impl GgufBuilder {
    pub fn new(spec: QuantizeSpec) -> Self {
        Self {
            spec,
            file: GgufWriter::new(),
            fallbacks: 0,
        }
    }

    /// Quantizes `t` (any float dtype, row-major) under llama.cpp name `gguf_name`.
    pub fn add(&mut self, gguf_name: &str, t: &Tensor) -> Result<()> {
        let want = self.spec.type_for(gguf_name, t.dims());
        let fell_back = self.file.add(gguf_name, t, want)?;
        self.fallbacks += usize::from(fell_back);
        Ok(())
    }

    /// Writes the file atomically. `tokenizer`: the `tokenizer.ggml.*` entries of a Qwen
    /// `tokenizer.json` to embed ([`crate::tokenizer::gguf::metadata`]), or why there are
    /// none (then skipped with a note in the returned list).
    pub fn write(
        mut self,
        out: &Path,
        cfg: &Qwen3Config,
        name: &str,
        tokenizer: Option<Result<Vec<(String, Value)>>>,
    ) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        self.file
            .add_metadata(cfg.gguf_metadata(name, file_type(self.spec.linear)));
        if let Some(tok) = tokenizer {
            match tok {
                Ok(m) => self.file.add_metadata(m),
                Err(e) => notes.push(format!(
                    "tokenizer not embedded ({e}); keep tokenizer.json beside the .gguf"
                )),
            }
        }
        self.file.write(out)?;
        Ok(notes)
    }
}

/// What [`quantize_model`] did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub tensors: usize,
    pub fallbacks: usize,
    pub bytes: u64,
    pub notes: Vec<String>,
}

/// `qwenclip quantize`: a Hugging Face Qwen3 folder -> one GGUF file (llama.cpp names and
/// metadata, the folder's tokenizer embedded). Tensors are converted one at a time from the
/// safetensors; the quantized ones are held until the file is written.
pub fn quantize_model(dir: &Path, spec: QuantizeSpec, out: &Path) -> Result<QuantizeReport> {
    let cfg = Qwen3Config::load(&dir.join("config.json"))?;
    let weights = Weights::open_model_dir(dir, DType::F32, &Device::Cpu)?;
    // Sorted by GGUF name: the same folder gives the same file.
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for n in weights.names() {
        let g = schema::hf_to_gguf(&n).ok_or_else(|| {
            Error::format(
                dir,
                format!("tensor `{n}` is not part of a Qwen3 (no GGUF name for it)"),
            )
        })?;
        names.insert(g, n);
    }
    let mut b = GgufBuilder::new(spec);
    for (g, n) in &names {
        let shape = weights.shape_of(n)?;
        b.add(g, &weights.get(n, &shape)?)?;
    }
    let (tensors, fallbacks) = (b.file.tensor_count(), b.fallbacks);
    let tok = dir.join("tokenizer.json");
    let name = dir
        .file_name()
        .map_or("qwen3".to_string(), |n| n.to_string_lossy().into_owned());
    let tok = tok
        .is_file()
        .then(|| crate::tokenizer::gguf::metadata(&tok, cfg.vocab_size));
    let notes = b.write(out, &cfg, &name, tok)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(QuantizeReport {
        tensors,
        fallbacks,
        bytes,
        notes,
    })
}
