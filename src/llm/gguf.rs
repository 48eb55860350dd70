//! Qwen3 in llama.cpp's GGUF: the `qwen3.*` metadata both ways, and what `info` totals.
//!
//! llama.cpp's converter permutes the q/k rows of `llama`-architecture models for its
//! interleaved RoPE; it does not for `qwen3` (NEOX-style RoPE, the same halves layout as
//! Hugging Face), and neither does `transformers`' GGUF loader undo anything for it. So
//! `blk.N.attn_q.weight` is `q_proj.weight` as stored by Hugging Face (checked against
//! files written by the `gguf` Python package in `tests/gguf.rs`).

use std::collections::BTreeMap;

use candle_core::quantized::gguf_file::Value;

use super::config::{default_eps, default_rope_theta, Qwen3Config};
use super::schema::{self, Param};
use crate::error::{Error, Result};
use crate::formats::gguf::{type_name, GgufFile};

/// What llama.cpp writes when a config does not say.
const DEFAULT_CONTEXT: usize = 40_960;

/// Fails unless `general.architecture` is `qwen3`.
pub fn check_architecture(g: &GgufFile) -> Result<()> {
    match g.architecture() {
        Some("qwen3") => Ok(()),
        Some(other) => Err(Error::format(
            g.path(),
            format!(
                "general.architecture is \"{other}\"; qwenclip reads only \"qwen3\" GGUF files (dense Qwen3 such as Qwen3-4B{})",
                if other == "qwen3moe" { "; Qwen3 MoE is not supported" } else { "" }
            ),
        )),
        None => Err(Error::format(
            g.path(),
            "no general.architecture in the metadata; expected \"qwen3\"",
        )),
    }
}

impl Qwen3Config {
    /// The model's shape from the `qwen3.*` metadata. `vocab_size` is the number of rows of
    /// the token embedding; embeddings count as tied when there is no `lm_head`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        check_architecture(g)?;
        let need = |k: &str| -> Result<usize> {
            g.meta_uint(&format!("qwen3.{k}"))?
                .ok_or_else(|| Error::format(g.path(), format!("metadata `qwen3.{k}` is missing")))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let emb = g.entry(&Param::Embedding.gguf_name())?;
        if emb.shape.len() != 2 || emb.shape[1] != hidden {
            return Err(Error::Shape {
                path: g.path().to_path_buf(),
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
            num_key_value_heads: g
                .meta_uint("qwen3.attention.head_count_kv")?
                .unwrap_or(heads),
            head_dim: Some(
                g.meta_uint("qwen3.attention.key_length")?
                    .unwrap_or(hidden / heads.max(1)),
            ),
            rope_theta: g
                .meta_float("qwen3.rope.freq_base")?
                .unwrap_or_else(default_rope_theta),
            rms_norm_eps: g
                .meta_float("qwen3.attention.layer_norm_rms_epsilon")?
                .unwrap_or_else(default_eps),
            tie_word_embeddings: !g.contains(&Param::LmHead.gguf_name()),
            attention_bias: false,
            max_position_embeddings: g.meta_uint("qwen3.context_length")?,
        };
        cfg.validate().map_err(|m| Error::format(g.path(), m))?;
        Ok(cfg)
    }

    /// The `general.*` and `qwen3.*` entries llama.cpp writes for this model.
    pub fn gguf_metadata(&self, name: &str, file_type: u32) -> Vec<(String, Value)> {
        let u = |x: usize| Value::U32(x as u32);
        let entries = [
            ("general.architecture", Value::String("qwen3".into())),
            ("general.name", Value::String(name.into())),
            ("general.file_type", Value::U32(file_type)),
            ("general.quantization_version", Value::U32(2)),
            (
                "qwen3.context_length",
                u(self.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT)),
            ),
            ("qwen3.embedding_length", u(self.hidden_size)),
            ("qwen3.block_count", u(self.num_hidden_layers)),
            ("qwen3.feed_forward_length", u(self.intermediate_size)),
            ("qwen3.attention.head_count", u(self.num_attention_heads)),
            ("qwen3.attention.head_count_kv", u(self.num_key_value_heads)),
            ("qwen3.attention.key_length", u(self.head_dim())),
            ("qwen3.attention.value_length", u(self.head_dim())),
            ("qwen3.rope.freq_base", Value::F32(self.rope_theta as f32)),
            (
                "qwen3.attention.layer_norm_rms_epsilon",
                Value::F32(self.rms_norm_eps as f32),
            ),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
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
