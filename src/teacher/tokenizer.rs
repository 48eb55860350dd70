//! CLIP tokenization as SDXL feeds its two text encoders: 77 ids = start token + up to 75
//! prompt tokens + end token, padded to 77 with the end token (49407) for CLIP-L and with id 0
//! for CLIP-G (diffusers' `tokenizer_2` pads with `"!"` = 0; ComfyUI pads CLIP-G with 0 too).
//! Longer prompts keep their first 75 tokens, as `truncation=True, max_length=77` does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

/// SDXL's sequence length for both encoders.
pub const SEQ_LEN: usize = 77;
/// Prompt tokens that fit between the start and end tokens.
pub const MAX_PROMPT_TOKENS: usize = SEQ_LEN - 2;
/// CLIP-G's padding id.
pub const CLIP_G_PAD_ID: u32 = 0;

/// The CLIP BPE `tokenizer.json` (49,408 tokens; see `tests/fixtures/tokenizers/PROVENANCE.md`),
/// used when a checkpoint carries no tokenizer of its own.
pub static EMBEDDED_CLIP_TOKENIZER: &[u8] = include_bytes!("../../assets/clip_tokenizer.json");

/// What messages call the embedded tokenizer's file.
const EMBEDDED_NAME: &str = "<embedded clip_tokenizer.json>";

/// What pads a row after the end token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The end token (CLIP-L in SDXL).
    EndToken,
    /// A fixed id (CLIP-G in SDXL: 0).
    Id(u32),
}

/// One prompt as SDXL encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdxlIds {
    /// Exactly [`SEQ_LEN`] ids.
    pub ids: Vec<u32>,
    /// Prompt tokens beyond [`MAX_PROMPT_TOKENS`] that were cut.
    pub dropped: usize,
}

pub struct ClipTokenizer {
    // Shared: the embedded tokenizer is parsed once per process (1.6 MB of JSON), not
    // on every teacher load.
    inner: Arc<tokenizers::Tokenizer>,
    /// `None`: the embedded tokenizer.
    path: Option<PathBuf>,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    /// The tokenizer compiled into qwenclip.
    pub fn embedded() -> Result<Self> {
        static PARSED: OnceLock<std::result::Result<Arc<tokenizers::Tokenizer>, String>> =
            OnceLock::new();
        let inner = PARSED
            .get_or_init(|| {
                tokenizers::Tokenizer::from_bytes(EMBEDDED_CLIP_TOKENIZER)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| Error::Tokenizer {
                path: PathBuf::from(EMBEDDED_NAME),
                msg: format!("cannot load: {e}"),
            })?;
        Self::new(inner, None)
    }

    /// A Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                msg: "file not found".into(),
            });
        }
        let inner = crate::tokenizer::read_tokenizer_json(path)?;
        Self::new(Arc::new(inner), Some(path.to_path_buf()))
    }

    fn new(inner: Arc<tokenizers::Tokenizer>, path: Option<PathBuf>) -> Result<Self> {
        let origin = path.clone().unwrap_or_else(|| PathBuf::from(EMBEDDED_NAME));
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| Error::Tokenizer {
                path: origin.clone(),
                msg: format!("no `{tok}` token: not a CLIP tokenizer"),
            })
        };
        let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        Ok(Self {
            inner,
            path,
            bos,
            eos,
        })
    }

    /// The file it was read from; `None` for the embedded one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// `path` or "embedded CLIP tokenizer", for messages.
    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "embedded CLIP tokenizer".to_string(),
        }
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Prompt tokens without start/end tokens and without truncation.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer {
                path: self
                    .path
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(EMBEDDED_NAME)),
                msg: format!("cannot tokenize prompt: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[start] + first 75 prompt tokens + [end]`, padded to 77.
    pub fn encode_sdxl(&self, prompt: &str, padding: Padding) -> Result<SdxlIds> {
        let mut content = self.prompt_ids(prompt)?;
        let dropped = content.len().saturating_sub(MAX_PROMPT_TOKENS);
        content.truncate(MAX_PROMPT_TOKENS);
        let pad = match padding {
            Padding::EndToken => self.eos,
            Padding::Id(id) => id,
        };
        let mut ids = Vec::with_capacity(SEQ_LEN);
        ids.push(self.bos);
        ids.extend_from_slice(&content);
        ids.push(self.eos);
        ids.resize(SEQ_LEN, pad);
        Ok(SdxlIds { ids, dropped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tokenizer_pads_like_sdxl() {
        let t = ClipTokenizer::embedded().unwrap();
        let l = t
            .encode_sdxl("a photo of a cat", Padding::EndToken)
            .unwrap();
        assert_eq!(&l.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(l.ids[7..].iter().all(|&i| i == 49407));
        let g = t.encode_sdxl("a photo of a cat", Padding::Id(0)).unwrap();
        assert!(g.ids[7..].iter().all(|&i| i == 0));
        assert_eq!((l.ids.len(), l.dropped), (SEQ_LEN, 0));
    }
}
