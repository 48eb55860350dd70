//! The Qwen tokenizer inside a GGUF (`tokenizer.ggml.*`): rebuilt into a `tokenizers`
//! tokenizer when reading, and written from a `tokenizer.json` when converting.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

// `tokenizer.ggml.token_type` values, as llama.cpp numbers them.
const NORMAL: i64 = 1;
/// A special added token.
const CONTROL: i64 = 3;
/// An added token that is not special.
const USER_DEFINED: i64 = 4;
/// Vocabulary padding: left out of the rebuilt tokenizer.
const UNUSED: i64 = 5;

/// A `tokenizers` tokenizer rebuilt from `tokenizer.ggml.*` (BPE `gpt2` model with the
/// `qwen2` pre-tokenizer, as llama.cpp writes for Qwen2/Qwen3): the same vocabulary,
/// merges, byte-level pre-tokenizer with Qwen2's split pattern, NFC normalizer, and the
/// control / user-defined tokens as added tokens.
pub fn read(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let fail = |why: String| {
        Error::format(
            g.path(),
            format!("{why}; put the model's tokenizer.json in the same folder as the .gguf"),
        )
    };
    let model = g.meta_str("tokenizer.ggml.model");
    if model != Some("gpt2") {
        return Err(fail(format!(
            "the embedded tokenizer is {} (only the byte-level BPE \"gpt2\" model of Qwen is rebuilt)",
            model.map_or("missing".to_string(), |m| format!("\"{m}\""))
        )));
    }
    let pre = g.meta_str("tokenizer.ggml.pre");
    if pre != Some("qwen2") {
        return Err(fail(format!(
            "the embedded tokenizer's pre-tokenizer is {} (only \"qwen2\" is rebuilt)",
            pre.map_or("missing".to_string(), |p| format!("\"{p}\""))
        )));
    }
    let tokens = g
        .meta_strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| fail("no tokenizer.ggml.tokens in the metadata".into()))?;
    let merges = g
        .meta_strings("tokenizer.ggml.merges")?
        .ok_or_else(|| fail("no tokenizer.ggml.merges in the metadata".into()))?;
    let types: Vec<i64> = match g.metadata().get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x as i64,
                Value::U32(x) => *x as i64,
                Value::I64(x) => *x,
                Value::U8(x) => *x as i64,
                Value::I8(x) => *x as i64,
                _ => NORMAL,
            })
            .collect(),
        _ => vec![NORMAL; tokens.len()],
    };
    let json = tokenizer_json(&tokens, &types, &merges);
    json.parse::<tokenizers::Tokenizer>()
        .map_err(|e| fail(format!("the embedded tokenizer cannot be rebuilt ({e})")))
}

/// `tokenizer.json` text for a Qwen2-style byte-level BPE.
fn tokenizer_json(tokens: &[&str], types: &[i64], merges: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(NORMAL) {
            CONTROL | USER_DEFINED => added.push(serde_json::json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[id] == CONTROL,
            })),
            UNUSED => {}
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

/// `tokenizer.ggml.*` entries from a Qwen `tokenizer.json`, as llama.cpp's converter writes
/// them: every id below `vocab_size`, missing ones as `[PAD{id}]` (unused).
pub fn metadata(path: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let json: serde_json::Value = crate::error::read_json(path, "tokenizer.json")?;
    metadata_from(&json, path, vocab_size)
}

/// [`metadata`] of the bytes of a `tokenizer.json`; `path` names them in errors.
pub fn metadata_of(json: &[u8], path: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let json: serde_json::Value = serde_json::from_slice(json).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        what: "tokenizer.json",
        source,
    })?;
    metadata_from(&json, path, vocab_size)
}

fn metadata_from(
    json: &serde_json::Value,
    path: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(Error::format(path, "not a BPE tokenizer"));
    }
    let byte_level = json["pre_tokenizer"].to_string().contains("ByteLevel");
    if !byte_level {
        return Err(Error::format(path, "not a byte-level BPE tokenizer"));
    }
    let mut tokens: Vec<Option<(String, i64)>> = vec![None; vocab_size];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::format(path, "model.vocab is not an object"))?;
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < vocab_size) {
            tokens[id] = Some((tok.clone(), NORMAL));
        }
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            continue;
        };
        if (id as usize) < vocab_size {
            let ty = if t["special"].as_bool().unwrap_or(false) {
                CONTROL
            } else {
                USER_DEFINED
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
        let (s, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        list.push(Value::String(s));
        types.push(Value::I32(ty as i32));
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
