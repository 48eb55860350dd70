//! Prompt tokenization for the LLM: `tokenizer.json` through `tokenizers` 0.23, a token limit
//! with a warning per truncated prompt, right padding with an attention mask, and the weight
//! of each token of a weighted prompt (`syntax`).

pub mod gguf;
pub mod syntax;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use syntax::WeightedPrompt;

/// Prompts longer than this are cut unless the adapter or caller says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 256;

#[derive(Clone)]
pub struct PromptTokenizer {
    // Shared: Qwen's vocabulary and merges are tens of MB, and every encoder clone (a
    // training run opened on a loaded encoder) would copy them.
    inner: Arc<tokenizers::Tokenizer>,
    path: PathBuf,
    pad_id: u32,
}

/// A tokenized batch, right padded to the longest prompt (at least one position, so an
/// all-empty batch still has a shape).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub ids: Vec<Vec<u32>>,
    /// 1 for a token, 0 for padding; same shape as `ids`.
    pub mask: Vec<Vec<u8>>,
    /// Prompt count of tokens after truncation.
    pub lengths: Vec<usize>,
    pub warnings: Vec<String>,
}

impl PromptTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "file not found (a model folder needs its tokenizer.json)".into(),
            });
        }
        Ok(Self::from_tokenizer(read_tokenizer_json(path)?, path))
    }

    /// Wraps an already built tokenizer (e.g. rebuilt from a GGUF's vocabulary); `origin`
    /// is the file error messages name.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, origin: &Path) -> Self {
        // Qwen pads with <|endoftext|>; any id works since padded positions are masked.
        let pad_id = ["<|endoftext|>", "<|im_end|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0);
        Self {
            inner: Arc::new(inner),
            path: origin.to_path_buf(),
            pad_id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of one prompt, without truncation.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot tokenize prompt: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Each token's weight in `prompt.text()` (untruncated, as `ids` gives them): the weight
    /// of the bytes it covers. Whitespace does not count (a word's token carries the space
    /// before it, which belongs to the span before), except in a token of whitespace only.
    /// Where a token crosses from one span into another (`(un)believable` read as one token),
    /// it takes the mean over its bytes; a token that covers no text (a special token)
    /// weighs 1.
    pub fn token_weights(&self, prompt: &WeightedPrompt) -> Result<Vec<f32>> {
        let text = prompt.text();
        let bytes = prompt.byte_weights();
        let enc = self
            .inner
            .encode(text.as_str(), true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot tokenize prompt: {e}"),
            })?;
        let raw = text.as_bytes();
        Ok(enc
            .get_offsets()
            .iter()
            .map(|&(a, b)| {
                let range = a.min(raw.len())..b.min(raw.len());
                let visible: Vec<f32> = range
                    .clone()
                    .filter(|&i| !raw[i].is_ascii_whitespace())
                    .map(|i| bytes[i])
                    .collect();
                let covered = if visible.is_empty() {
                    &bytes[range]
                } else {
                    &visible[..]
                };
                match covered.first() {
                    None => 1.0,
                    Some(&w) if covered.iter().all(|&x| x == w) => w,
                    Some(_) => {
                        let sum: f64 = covered.iter().map(|&x| f64::from(x)).sum();
                        (sum / covered.len() as f64) as f32
                    }
                }
            })
            .collect())
    }

    pub fn encode_batch(&self, prompts: &[&str], max_tokens: usize) -> Result<TokenBatch> {
        if max_tokens == 0 {
            return Err(Error::Invalid("token limit must be at least 1".into()));
        }
        let mut rows = Vec::with_capacity(prompts.len());
        let mut warnings = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut ids = self.ids(p)?;
            if ids.len() > max_tokens {
                let dropped = ids.len() - max_tokens;
                warnings.push(format!(
                    "prompt {i} has {} tokens; the last {dropped} were dropped (limit {max_tokens})",
                    ids.len()
                ));
                ids.truncate(max_tokens);
            }
            rows.push(ids);
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let mask = lengths
            .iter()
            .map(|&n| (0..t).map(|j| u8::from(j < n)).collect())
            .collect();
        let ids = rows
            .into_iter()
            .map(|mut r| {
                r.resize(t, self.pad_id);
                r
            })
            .collect();
        Ok(TokenBatch {
            ids,
            mask,
            lengths,
            warnings,
        })
    }
}

impl TokenBatch {
    /// `[B,T]` u32 ids.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let b = self.ids.len();
        let t = self.ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = self.ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (b, t), device)?)
    }

    /// `[B,T]` f32 mask (1 = token).
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        mask_tensor(&self.mask, device)
    }
}

/// A `tokenizer.json` read by the `tokenizers` crate. Some malformed files make that crate
/// panic instead of failing (found by fuzzing): the panic becomes an error naming the file.
pub(crate) fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let read = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path));
    let msg = match read {
        Ok(Ok(t)) => return Ok(t),
        Ok(Err(e)) => format!("cannot load: {e}"),
        Err(panic) => format!(
            "cannot load: malformed tokenizer ({})",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the tokenizers library gave up")
        ),
    };
    Err(Error::Tokenizer {
        path: path.to_path_buf(),
        msg,
    })
}

/// `[B,T]` f32 tensor from 0/1 rows.
pub fn mask_tensor(mask: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let t = mask.first().map_or(0, Vec::len);
    let flat: Vec<f32> = mask.iter().flatten().map(|&m| m as f32).collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}
