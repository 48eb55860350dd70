//! Qwen3 configuration, read straight from a Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{read_json, Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it explicitly (128 for every released size, != hidden/heads for some).
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

pub(super) fn default_rope_theta() -> f64 {
    1_000_000.0
}

pub(super) fn default_eps() -> f64 {
    1e-6
}

impl Qwen3Config {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::format(path, "config.json not found"));
        }
        let cfg: Self = read_json(path, "Qwen3 config.json")?;
        cfg.validate().map_err(|msg| Error::format(path, msg))?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The checks `load` runs (also applied to configs read from GGUF metadata).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = &self.model_type {
            if t != "qwen3" {
                return Err(format!("model_type is \"{t}\", expected \"qwen3\""));
            }
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim()),
        ] {
            if v == 0 {
                return Err(format!("field `{name}` must be > 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.attention_bias {
            return Err("attention_bias = true is not Qwen3 (Qwen2 layout?)".into());
        }
        Ok(())
    }

    /// A short text naming the architecture's shape, for error messages and `info`.
    pub fn shape_summary(&self) -> String {
        let [h, l, heads, kv, hd, ffn, vocab] = self.dims();
        format!("hidden {h} x {l} layers, {heads} heads / {kv} KV heads of {hd}, ffn {ffn}, vocab {vocab}")
    }

    /// sha256 over the fields that decide whether weights made for one base fit another.
    pub fn fingerprint(&self) -> String {
        let [h, l, heads, kv, hd, ffn, vocab] = self.dims();
        let key =
            format!("qwen3;h={h};l={l};heads={heads};kv={kv};hd={hd};ffn={ffn};vocab={vocab}");
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// The sizes that decide every tensor's shape (see [`Qwen3Config::tensors`]).
    fn dims(&self) -> [usize; 7] {
        [
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim(),
            self.intermediate_size,
            self.vocab_size,
        ]
    }

    /// Resolves a `transformers`-style `hidden_states` index (negative counts from the end)
    /// to how many decoder layers to run; the final norm applies only at the last index.
    pub fn resolve_hidden_layer(&self, index: i32) -> Result<usize> {
        let n = self.num_hidden_layers as i64 + 1;
        let i = index as i64;
        let k = if i < 0 { n + i } else { i };
        if !(0..n).contains(&k) {
            return Err(Error::Invalid(format!(
                "hidden layer {index} is out of range for a model with {} layers (valid: -{n}..={})",
                self.num_hidden_layers,
                n - 1
            )));
        }
        Ok(k as usize)
    }
}
