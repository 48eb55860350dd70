//! GGUF, llama.cpp's single-file format: reading a Qwen3 (config from the `qwen3.*` metadata,
//! llama.cpp tensor names, quantized blocks kept as they are), building its tokenizer from the
//! embedded vocabulary, and writing quantized Qwen3 files (`qwenclip quantize`, random
//! benchmark models).
//!
//! llama.cpp's converter permutes the q/k rows of `llama`-architecture models for its
//! interleaved RoPE; it does not for `qwen3` (NEOX-style RoPE, the same halves layout as
//! Hugging Face), and neither does `transformers`' GGUF loader undo anything for it. So
//! `blk.N.attn_q.weight` is `q_proj.weight` as stored by Hugging Face (checked against
//! files written by the `gguf` Python package in `tests/gguf.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::llm::schema::{self, Group, Param};
use crate::llm::Qwen3Config;
use crate::ops::QMatrix;

/// Name of a ggml tensor type id (the ones candle cannot read included, for messages).
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The name llama.cpp uses for a candle type.
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (as in Q4_K_M, Q5_K_M, Q6_K, Q8_0 files)";

/// True for the float types that are read into dense tensors instead of quantized blocks.
pub fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// True when `path` names a GGUF file (by extension: that is how `--model` dispatches; a
/// folder whose name ends in `.gguf` is still a folder).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}

/// An opened GGUF: metadata and tensor directory (the tensor data stays on disk until read).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: GgmlDType,
    /// Row-major (`[out, in]` for a weight), i.e. GGUF's dimensions reversed.
    pub shape: Vec<usize>,
    pub bytes: usize,
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory, and checks that every tensor's data
    /// lies inside the file (a truncated download fails here, naming the first missing tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut magic = [0u8; 4];
        if len < 4 || f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::format(
                path,
                "not a GGUF file (it does not start with the bytes \"GGUF\")",
            ));
        }
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        let mut reader = std::io::BufReader::new(f);
        let content = Content::read(&mut reader).map_err(|e| {
            // First line only: candle appends a backtrace when RUST_BACKTRACE is set.
            let msg = e.to_string().lines().next().unwrap_or_default().to_string();
            match msg
                .split("unknown dtype for tensor ")
                .nth(1)
                .and_then(|s| {
                    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<u32>().ok()
                })
            {
                Some(id) => Error::format(
                    path,
                    format!(
                        "holds tensors of type {} (ggml type {id}), which qwenclip cannot read; supported: {SUPPORTED}",
                        ggml_type_name(id)
                    ),
                ),
                None => Error::format(
                    path,
                    format!("truncated or corrupt GGUF header ({msg})"),
                ),
            }
        })?;
        let file = Self {
            path: path.to_path_buf(),
            content,
        };
        let mut entries = file.tensors();
        entries.sort_by_key(|e| file.content.tensor_infos[&e.name].offset);
        for e in entries {
            let info = &file.content.tensor_infos[&e.name];
            let block = e.dtype.block_size();
            let elems: usize = e.shape.iter().product();
            if e.shape.last().is_some_and(|&r| !r.is_multiple_of(block))
                || !elems.is_multiple_of(block)
            {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}` {:?} is not a whole number of {} blocks",
                        e.name,
                        e.shape,
                        type_name(e.dtype)
                    ),
                ));
            }
            let end = file
                .content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(e.bytes as u64);
            if end > len {
                return Err(Error::format(
                    path,
                    format!(
                        "truncated: tensor `{}` ends at byte {end} but the file has {len} bytes (an incomplete download?)",
                        e.name
                    ),
                ));
            }
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.meta_str("general.architecture")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor, in no particular order.
    pub fn tensors(&self) -> Vec<TensorEntry> {
        self.content
            .tensor_infos
            .iter()
            .map(|(name, info)| Self::entry_of(name, info))
            .collect()
    }

    pub fn entry(&self, name: &str) -> Result<TensorEntry> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        Ok(Self::entry_of(name, info))
    }

    fn entry_of(name: &str, info: &candle_core::quantized::gguf_file::TensorInfo) -> TensorEntry {
        let shape = info.shape.dims().to_vec();
        let elems: usize = shape.iter().product();
        TensorEntry {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            bytes: elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size(),
            shape,
        }
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn meta_uint(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => match v {
                Value::U8(_)
                | Value::U16(_)
                | Value::U32(_)
                | Value::U64(_)
                | Value::I8(_)
                | Value::I16(_)
                | Value::I32(_)
                | Value::I64(_) => {
                    let n = match v {
                        Value::I8(x) => *x as i64,
                        Value::I16(x) => *x as i64,
                        Value::I32(x) => *x as i64,
                        Value::I64(x) => *x,
                        other => other.to_u64().map(|x| x as i64).unwrap_or(-1),
                    };
                    usize::try_from(n).map(Some).map_err(|_| {
                        Error::format(&self.path, format!("metadata `{key}` is negative ({n})"))
                    })
                }
                other => Err(Error::format(
                    &self.path,
                    format!(
                        "metadata `{key}` should be an integer, found {:?}",
                        other.value_type()
                    ),
                )),
            },
        }
    }

    /// A float as the shortest decimal that round-trips its f32 (1e-6 stays 1e-6).
    fn meta_float(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(Error::format(
                &self.path,
                format!(
                    "metadata `{key}` should be a float, found {:?}",
                    other.value_type()
                ),
            )),
        }
    }

    fn meta_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(Error::format(
                        &self.path,
                        format!("metadata `{key}` should be a list of strings"),
                    )),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(Error::format(
                &self.path,
                format!("metadata `{key}` should be a list"),
            )),
        }
    }

    /// Fails unless `general.architecture` is `qwen3`.
    pub fn check_qwen3(&self) -> Result<()> {
        match self.architecture() {
            Some("qwen3") => Ok(()),
            Some(other) => Err(Error::format(
                &self.path,
                format!(
                    "general.architecture is \"{other}\"; qwenclip reads only \"qwen3\" GGUF files (dense Qwen3 such as Qwen3-4B{})",
                    if other == "qwen3moe" { "; Qwen3 MoE is not supported" } else { "" }
                ),
            )),
            None => Err(Error::format(
                &self.path,
                "no general.architecture in the metadata; expected \"qwen3\"",
            )),
        }
    }

    /// The model's shape from the `qwen3.*` metadata. `vocab_size` is the number of rows of
    /// `token_embd.weight`; embeddings count as tied when there is no `output.weight`.
    pub fn qwen3_config(&self) -> Result<Qwen3Config> {
        self.check_qwen3()?;
        let need = |k: &str| -> Result<usize> {
            self.meta_uint(&format!("qwen3.{k}"))?.ok_or_else(|| {
                Error::format(&self.path, format!("metadata `qwen3.{k}` is missing"))
            })
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let emb = self.entry(&Param::Embedding.gguf_name())?;
        if emb.shape.len() != 2 || emb.shape[1] != hidden {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: emb.name,
                expected: vec![0, hidden],
                got: emb.shape,
            });
        }
        let cfg = Qwen3Config {
            model_type: Some("qwen3".into()),
            vocab_size: emb.shape[0],
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self
                .meta_uint("qwen3.attention.head_count_kv")?
                .unwrap_or(heads),
            head_dim: Some(
                self.meta_uint("qwen3.attention.key_length")?
                    .unwrap_or(hidden / heads.max(1)),
            ),
            rope_theta: self
                .meta_float("qwen3.rope.freq_base")?
                .unwrap_or(1_000_000.0),
            rms_norm_eps: self
                .meta_float("qwen3.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-6),
            tie_word_embeddings: !self.contains(&Param::LmHead.gguf_name()),
            attention_bias: false,
            max_position_embeddings: self.meta_uint("qwen3.context_length")?,
        };
        cfg.validate().map_err(|m| Error::format(&self.path, m))?;
        Ok(cfg)
    }

    /// Opens the file for reading tensor data.
    pub fn reader(&self) -> Result<TensorReader<'_>> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(TensorReader { gguf: self, file })
    }

    /// A `tokenizers` tokenizer rebuilt from `tokenizer.ggml.*` (BPE `gpt2` model with the
    /// `qwen2` pre-tokenizer, as llama.cpp writes for Qwen2/Qwen3): the same vocabulary,
    /// merges, byte-level pre-tokenizer with Qwen2's split pattern, NFC normalizer, and the
    /// control / user-defined tokens as added tokens.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let fail = |why: String| {
            Error::format(
                &self.path,
                format!("{why}; put the model's tokenizer.json in the same folder as the .gguf"),
            )
        };
        let model = self.meta_str("tokenizer.ggml.model");
        if model != Some("gpt2") {
            return Err(fail(format!(
                "the embedded tokenizer is {} (only the byte-level BPE \"gpt2\" model of Qwen is rebuilt)",
                model.map_or("missing".to_string(), |m| format!("\"{m}\""))
            )));
        }
        let pre = self.meta_str("tokenizer.ggml.pre");
        if pre != Some("qwen2") {
            return Err(fail(format!(
                "the embedded tokenizer's pre-tokenizer is {} (only \"qwen2\" is rebuilt)",
                pre.map_or("missing".to_string(), |p| format!("\"{p}\""))
            )));
        }
        let tokens = self
            .meta_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| fail("no tokenizer.ggml.tokens in the metadata".into()))?;
        let merges = self
            .meta_strings("tokenizer.ggml.merges")?
            .ok_or_else(|| fail("no tokenizer.ggml.merges in the metadata".into()))?;
        let types: Vec<i64> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    Value::U32(x) => *x as i64,
                    Value::I64(x) => *x,
                    Value::U8(x) => *x as i64,
                    Value::I8(x) => *x as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let json = tokenizer_json(&tokens, &types, &merges);
        json.parse::<tokenizers::Tokenizer>()
            .map_err(|e| fail(format!("the embedded tokenizer cannot be rebuilt ({e})")))
    }
}

/// `tokenizer.json` text for a Qwen2-style byte-level BPE. Token types follow llama.cpp:
/// 1 normal, 3 control (special added token), 4 user-defined (added, not special),
/// 5 unused (vocabulary padding, left out).
fn tokenizer_json(tokens: &[&str], types: &[i64], merges: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            3 | 4 => added.push(serde_json::json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[id] == 3,
            })),
            5 => {}
            _ => {
                if !vocab.contains_key(*tok) {
                    vocab.insert(tok.to_string(), serde_json::json!(id));
                }
            }
        }
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    })
    .to_string()
}

/// Qwen2's pre-tokenizer split pattern (llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Reads tensor data from an open [`GgufFile`].
pub struct TensorReader<'a> {
    gguf: &'a GgufFile,
    file: File,
}

impl TensorReader<'_> {
    fn raw(&mut self, name: &str, expected: &[usize]) -> Result<(TensorEntry, Vec<u64>)> {
        let path = &self.gguf.path;
        let entry = self.gguf.entry(name)?;
        if entry.shape != expected {
            return Err(Error::Shape {
                path: path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: entry.shape,
            });
        }
        let info = &self.gguf.content.tensor_infos[name];
        let start = self.gguf.content.tensor_data_offset + info.offset;
        // u64 words: the bytes are reinterpreted as blocks, which needs their alignment.
        let mut words = vec![0u64; entry.bytes.div_ceil(8)];
        // SAFETY: `words` owns at least `entry.bytes` bytes; u8 has alignment 1.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, entry.bytes) };
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| {
                Error::format(path, format!("tensor `{name}`: cannot read its data ({e})"))
            })?;
        Ok((entry, words))
    }

    /// A weight kept quantized (`[out, in]`).
    pub fn qmatrix(
        &mut self,
        name: &str,
        shape: (usize, usize),
        device: &Device,
    ) -> Result<QMatrix> {
        let (entry, words) = self.raw(name, &[shape.0, shape.1])?;
        QMatrix::from_bytes(as_bytes(&words, entry.bytes), entry.dtype, shape, device)
            .map_err(|e| Error::format(&self.gguf.path, format!("tensor `{name}`: {e}")))
    }

    /// Any tensor as a dense tensor of `dtype` (float types are converted, quantized ones
    /// dequantized).
    pub fn dense(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (entry, words) = self.raw(name, shape)?;
        let bytes = as_bytes(&words, entry.bytes);
        let err =
            |e: candle_core::Error| Error::format(&self.gguf.path, format!("tensor `{name}`: {e}"));
        let t = match entry.dtype {
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, &Device::Cpu),
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, &Device::Cpu),
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, &Device::Cpu),
            q => {
                let n: usize = shape.iter().product();
                let row = *shape.last().unwrap_or(&1);
                QMatrix::from_bytes(bytes, q, (n / row.max(1), row), &Device::Cpu)
                    .and_then(|m| m.dequantize())
                    .and_then(|t| t.reshape(shape))
            }
        }
        .map_err(err)?;
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(err)
    }
}

fn as_bytes(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: a u64 slice is at least `8 * words.len() >= len` initialised bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, len) }
}

// ---------------------------------------------------------------------------------------
// Writing

/// What `qwenclip quantize` and the random GGUF generator store.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeSpec {
    /// Decoder projections.
    pub linear: GgmlDType,
    /// `token_embd` (and `output` for untied models).
    pub embedding: GgmlDType,
}

impl QuantizeSpec {
    /// `q4_k`, `q5_k`, `q6_k`, `q8_0`, `q4_0`, `f16`, `f32`.
    pub fn parse_type(name: &str) -> Result<GgmlDType> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "q4_k" | "q4k" => GgmlDType::Q4K,
            "q5_k" | "q5k" => GgmlDType::Q5K,
            "q6_k" | "q6k" => GgmlDType::Q6K,
            "q8_0" | "q80" => GgmlDType::Q8_0,
            "q4_0" => GgmlDType::Q4_0,
            "f16" => GgmlDType::F16,
            "f32" => GgmlDType::F32,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown quantization type \"{other}\" (q4_k, q5_k, q6_k, q8_0, q4_0, f16, f32)"
                )))
            }
        })
    }

    /// The type a tensor is stored in, and whether that is a fallback: norms stay F32; a
    /// row that is not a whole number of blocks falls back to Q8_0 (32), then F32 (tiny
    /// test models).
    pub fn type_for(&self, gguf_name: &str, shape: &[usize]) -> (GgmlDType, bool) {
        let want = match schema::parse_gguf(gguf_name).map(|(p, _)| p.group()) {
            _ if shape.len() < 2 => return (GgmlDType::F32, false),
            Some(Group::Norms) => return (GgmlDType::F32, false),
            Some(Group::Embeddings) => self.embedding,
            _ => self.linear,
        };
        let row = shape[shape.len() - 1];
        let got = [want, GgmlDType::Q8_0, GgmlDType::F32]
            .into_iter()
            .find(|t| row.is_multiple_of(t.block_size()))
            .unwrap_or(GgmlDType::F32);
        (got, got != want)
    }

    /// llama.cpp's `general.file_type` for the linear type.
    fn file_type(&self) -> u32 {
        match self.linear {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::Q4_0 => 2,
            GgmlDType::Q8_0 => 7,
            GgmlDType::Q4K => 14,
            GgmlDType::Q5K => 16,
            GgmlDType::Q6K => 18,
            _ => 0,
        }
    }
}

/// Accumulates quantized tensors and writes a Qwen3 GGUF with llama.cpp's metadata.
pub struct GgufBuilder {
    spec: QuantizeSpec,
    tensors: Vec<(String, QTensor)>,
    /// How many tensors were stored in another type than asked (rows not a whole block).
    pub fallbacks: usize,
}

impl GgufBuilder {
    pub fn new(spec: QuantizeSpec) -> Self {
        Self {
            spec,
            tensors: Vec::new(),
            fallbacks: 0,
        }
    }

    /// Quantizes `t` (any float dtype, row-major) under llama.cpp name `gguf_name`.
    pub fn add(&mut self, gguf_name: &str, t: &Tensor) -> Result<()> {
        let (ty, fell_back) = self.spec.type_for(gguf_name, t.dims());
        self.fallbacks += usize::from(fell_back);
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let q = QTensor::quantize(&t, ty)
            .map_err(|e| Error::Invalid(format!("cannot quantize `{gguf_name}`: {e}")))?;
        self.tensors.push((gguf_name.to_string(), q));
        Ok(())
    }

    /// Writes the file atomically (temporary file in the same folder, then rename).
    /// `tokenizer_json`: a Qwen `tokenizer.json` to embed (skipped with a note in the
    /// returned list when it is not a byte-level BPE).
    pub fn write(
        self,
        out: &Path,
        cfg: &Qwen3Config,
        name: &str,
        tokenizer_json: Option<&Path>,
    ) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let u = |x: usize| Value::U32(x as u32);
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("qwen3".into())),
            ("general.name".into(), Value::String(name.into())),
            (
                "general.file_type".into(),
                Value::U32(self.spec.file_type()),
            ),
            ("general.quantization_version".into(), Value::U32(2)),
            (
                "qwen3.context_length".into(),
                u(cfg.max_position_embeddings.unwrap_or(40_960)),
            ),
            ("qwen3.embedding_length".into(), u(cfg.hidden_size)),
            ("qwen3.block_count".into(), u(cfg.num_hidden_layers)),
            ("qwen3.feed_forward_length".into(), u(cfg.intermediate_size)),
            (
                "qwen3.attention.head_count".into(),
                u(cfg.num_attention_heads),
            ),
            (
                "qwen3.attention.head_count_kv".into(),
                u(cfg.num_key_value_heads),
            ),
            ("qwen3.attention.key_length".into(), u(cfg.head_dim())),
            ("qwen3.attention.value_length".into(), u(cfg.head_dim())),
            (
                "qwen3.rope.freq_base".into(),
                Value::F32(cfg.rope_theta as f32),
            ),
            (
                "qwen3.attention.layer_norm_rms_epsilon".into(),
                Value::F32(cfg.rms_norm_eps as f32),
            ),
        ];
        if let Some(tok) = tokenizer_json {
            match tokenizer_metadata(tok, cfg.vocab_size) {
                Ok(m) => meta.extend(m),
                Err(e) => notes.push(format!(
                    "tokenizer not embedded ({e}); keep tokenizer.json beside the .gguf"
                )),
            }
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        crate::formats::atomic::replace_atomic(out, |f| {
            let mut w = BufWriter::new(f);
            candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs)
                .map_err(|e| Error::format(out, format!("cannot write GGUF: {e}")))?;
            w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
            Ok(())
        })?;
        Ok(notes)
    }
}

/// `tokenizer.ggml.*` entries from a Qwen `tokenizer.json`, as llama.cpp's converter writes
/// them: every id below `vocab_size`, missing ones as `[PAD{id}]` (type 5, unused).
fn tokenizer_metadata(path: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let json: serde_json::Value = crate::error::read_json(path, "tokenizer.json")?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(Error::format(path, "not a BPE tokenizer"));
    }
    let byte_level = json["pre_tokenizer"].to_string().contains("ByteLevel");
    if !byte_level {
        return Err(Error::format(path, "not a byte-level BPE tokenizer"));
    }
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::format(path, "model.vocab is not an object"))?;
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
            tokens[id] = Some((tok.clone(), 1));
        }
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            continue;
        };
        if (id as usize) < vocab_size {
            let ty = if t["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            tokens[id as usize] = Some((content.to_string(), ty));
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .ok_or_else(|| Error::format(path, "model.merges is not a list"))?
        .iter()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => {
                Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    let find = |name: &str| {
        tokens
            .iter()
            .position(|t| t.as_ref().is_some_and(|(s, _)| s == name))
    };
    let eos = find("<|endoftext|>");
    let mut list = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (i, t) in tokens.into_iter().enumerate() {
        let (s, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), 5));
        list.push(Value::String(s));
        types.push(Value::I32(ty));
    }
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(list)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
    ];
    if let Some(eos) = eos {
        for k in ["eos_token_id", "padding_token_id", "bos_token_id"] {
            meta.push((format!("tokenizer.ggml.{k}"), Value::U32(eos as u32)));
        }
    }
    Ok(meta)
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
/// memory-mapped safetensors; the quantized ones are held until the file is written.
pub fn quantize_model(dir: &Path, spec: QuantizeSpec, out: &Path) -> Result<QuantizeReport> {
    let cfg = Qwen3Config::load(&dir.join("config.json"))?;
    let weights = crate::formats::Weights::open_model_dir(dir, DType::F32, &Device::Cpu)?;
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for n in weights.names() {
        match schema::hf_to_gguf(&n) {
            Some(g) => {
                names.insert(g, n);
            }
            None => {
                return Err(Error::format(
                    dir,
                    format!("tensor `{n}` is not part of a Qwen3 (no GGUF name for it)"),
                ))
            }
        }
    }
    let mut b = GgufBuilder::new(spec);
    for (g, n) in &names {
        let shape = weights.shape_of(n)?;
        b.add(g, &weights.get(n, &shape)?)?;
    }
    let (tensors, fallbacks) = (b.tensors.len(), b.fallbacks);
    let tok = dir.join("tokenizer.json");
    let name = dir
        .file_name()
        .map_or("qwen3".to_string(), |n| n.to_string_lossy().into_owned());
    let notes = b.write(out, &cfg, &name, tok.is_file().then_some(tok.as_path()))?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(QuantizeReport {
        tensors,
        fallbacks,
        bytes,
        notes,
    })
}

/// One group's totals for `qwenclip info`.
#[derive(Debug, Clone, Default)]
pub struct GroupSummary {
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
    /// Type name -> number of tensors.
    pub types: BTreeMap<&'static str, usize>,
}

/// Totals per group (embeddings, attention, mlp, norms, and `other` for tensors that are not
/// part of a Qwen3) for `qwenclip info`.
pub fn group_summary(gguf: &GgufFile) -> BTreeMap<&'static str, GroupSummary> {
    let mut groups: BTreeMap<&'static str, GroupSummary> = BTreeMap::new();
    for e in gguf.tensors() {
        let group = schema::parse_gguf(&e.name).map_or("other", |(p, _)| p.group().name());
        let g = groups.entry(group).or_default();
        g.tensors += 1;
        g.parameters += e.shape.iter().product::<usize>();
        g.bytes += e.bytes;
        *g.types.entry(type_name(e.dtype)).or_default() += 1;
    }
    groups
}
