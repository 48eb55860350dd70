//! The encoder as users see it: prompts -> tokenizer -> Qwen3 (+ LoRA) -> resampler -> SDXL
//! conditioning (`prompt_embeds` `[B,77,2048]`, `pooled_prompt_embeds` `[B,1280]`, f32).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::formats::gguf::{self, GgufFile};
use crate::llm::gguf::check_architecture;
use crate::llm::qwen3::LoraMode;
use crate::llm::Qwen3;
use crate::ops::ForwardMode;
use crate::resampler::Resampler;
use crate::tokenizer::syntax::{PromptSyntax, WeightedPrompt};
use crate::tokenizer::{PromptTokenizer, TokenBatch, DEFAULT_MAX_TOKENS};

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub device: Device,
    /// Dtype of the LLM weights and activations (the resampler is always f32).
    pub dtype: DType,
    /// Overrides the adapter's token limit.
    pub max_tokens: Option<usize>,
    /// Overrides the adapter's hidden layer.
    pub hidden_layer: Option<i32>,
    /// Merged for inference; the trainer asks for unmerged.
    pub lora_mode: LoraMode,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            max_tokens: None,
            hidden_layer: None,
            lora_mode: LoraMode::Merged,
        }
    }
}

/// LLM output for a batch, before the resampler.
pub struct HiddenStates {
    /// `[B,T,H]` in the LLM dtype.
    pub states: Tensor,
    /// `[B,T]` f32, 1 = token.
    pub mask: Tensor,
    pub tokens: TokenBatch,
}

pub struct Conditioning {
    /// `[B,77,2048]` f32.
    pub prompt_embeds: Tensor,
    /// `[B,1280]` f32.
    pub pooled: Tensor,
    pub warnings: Vec<String>,
}

impl Conditioning {
    /// Copies `prompt_embeds` and `pooled` (row-major f32) straight from their storage into
    /// caller-owned buffers of exactly their sizes, as `qwenclip_encode` fills a C caller's.
    pub fn copy_to(&self, embeds: &mut [f32], pooled: &mut [f32]) -> Result<()> {
        copy_f32(&self.prompt_embeds, embeds, "prompt_embeds")?;
        copy_f32(&self.pooled, pooled, "pooled")
    }
}

/// Copies an f32 tensor straight from its storage into `dst`, which holds exactly its values.
fn copy_f32(t: &Tensor, dst: &mut [f32], name: &str) -> Result<()> {
    if dst.len() != t.elem_count() {
        return Err(Error::Invalid(format!(
            "a buffer of {} floats for {name} {:?}",
            dst.len(),
            t.dims()
        )));
    }
    let t = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(
            candle_core::Error::Msg("output is not on the CPU after transfer".into()).into(),
        );
    };
    let src = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    dst.copy_from_slice(&src[start..start + dst.len()]);
    Ok(())
}

/// Cloning is cheap: weights are shared (reference-counted), adapters are per clone.
#[derive(Clone)]
pub struct Encoder {
    tokenizer: PromptTokenizer,
    llm: Qwen3,
    base_name: String,
    resampler: Option<Resampler>,
    adapter_dir: Option<PathBuf>,
    hidden_layer: i32,
    max_tokens: usize,
    opts: EncoderOptions,
}

impl Encoder {
    /// `model_dir`: a Hugging Face Qwen3 folder (see [`crate::hub::resolve_model`] for ids),
    /// or a llama.cpp `.gguf` file (see [`Encoder::load_gguf`]).
    pub fn load(model_dir: &Path, adapter: Option<&Path>, opts: EncoderOptions) -> Result<Self> {
        let (tokenizer, llm) = if gguf::is_gguf(model_dir) {
            Self::load_gguf(model_dir, &opts)?
        } else {
            (
                PromptTokenizer::load(&model_dir.join("tokenizer.json"))?,
                Qwen3::load(model_dir, opts.dtype, &opts.device)?,
            )
        };
        let name = if gguf::is_gguf(model_dir) {
            model_dir.file_stem()
        } else {
            model_dir.file_name()
        };
        let base_name = name.map_or_else(
            || model_dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut enc = Self {
            tokenizer,
            llm,
            base_name,
            resampler: None,
            adapter_dir: None,
            hidden_layer: opts.hidden_layer.unwrap_or(-1),
            max_tokens: opts.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            opts,
        };
        enc.llm.config().resolve_hidden_layer(enc.hidden_layer)?;
        if let Some(dir) = adapter {
            enc.set_adapter(Some(dir))?;
        }
        Ok(enc)
    }

    /// A GGUF base: the tokenizer is the `tokenizer.json` in the same folder when there is
    /// one, else the one embedded in the GGUF (Qwen's byte-level BPE), rebuilt.
    fn load_gguf(path: &Path, opts: &EncoderOptions) -> Result<(PromptTokenizer, Qwen3)> {
        let file = GgufFile::open(path)?;
        check_architecture(&file)?;
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.is_file() {
            PromptTokenizer::load(&beside)?
        } else {
            let inner = crate::tokenizer::gguf::read(&file).map_err(|e| match e {
                Error::Format { path, msg } => Error::Tokenizer {
                    path,
                    msg: format!("no tokenizer.json beside it, and {msg}"),
                },
                other => other,
            })?;
            PromptTokenizer::from_tokenizer(inner, path)
        };
        let llm = Qwen3::from_gguf(&file, opts.dtype, &opts.device, Default::default())?;
        Ok((tokenizer, llm))
    }

    /// Attaches, replaces (`Some`) or removes (`None`) the adapter without reloading the base.
    /// On error the encoder keeps its previous adapter.
    pub fn set_adapter(&mut self, dir: Option<&Path>) -> Result<()> {
        let Some(dir) = dir else {
            self.llm.clear_lora()?;
            self.resampler = None;
            self.adapter_dir = None;
            self.hidden_layer = self.opts.hidden_layer.unwrap_or(-1);
            self.max_tokens = self.opts.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
            return Ok(());
        };
        let adapter = Adapter::load(dir, &self.opts.device)?;
        self.install(adapter)
    }

    /// Installs an already loaded adapter (the trainer builds them in memory).
    pub fn install(&mut self, adapter: Adapter) -> Result<()> {
        adapter.check_base(self.llm.config())?;
        let hidden_layer = self
            .opts
            .hidden_layer
            .or(adapter.manifest.as_ref().map(|m| m.hidden_layer))
            .unwrap_or(-1);
        self.llm.config().resolve_hidden_layer(hidden_layer)?;
        if let Some(r) = &adapter.resampler {
            if r.config().input_dim != self.llm.config().hidden_size {
                return Err(Error::Mismatch(format!(
                    "{}: resampler input width {} != base hidden size {}",
                    adapter.dir.display(),
                    r.config().input_dim,
                    self.llm.config().hidden_size
                )));
            }
        }
        match adapter.lora {
            Some(lora) => self.llm.set_lora(lora, self.opts.lora_mode)?,
            None => self.llm.clear_lora()?,
        }
        self.max_tokens = self
            .opts
            .max_tokens
            .or(adapter.manifest.as_ref().map(|m| m.max_tokens))
            .unwrap_or(DEFAULT_MAX_TOKENS);
        self.hidden_layer = hidden_layer;
        self.resampler = adapter.resampler;
        self.adapter_dir = Some(adapter.dir);
        Ok(())
    }

    /// How the next adapter's LoRA is applied (merged for inference, unmerged to train it).
    pub fn set_lora_mode(&mut self, mode: LoraMode) {
        self.opts.lora_mode = mode;
    }

    /// Bytes of weights this encoder holds (LLM, LoRA, resampler) on its device.
    pub fn weight_bytes(&self) -> usize {
        let r = self.resampler.as_ref().map_or(0, |r| {
            r.params()
                .values()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum()
        });
        self.llm.weight_bytes() + r
    }

    pub fn llm(&self) -> &Qwen3 {
        &self.llm
    }

    pub fn llm_mut(&mut self) -> &mut Qwen3 {
        &mut self.llm
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn resampler(&self) -> Option<&Resampler> {
        self.resampler.as_ref()
    }

    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    pub fn adapter_dir(&self) -> Option<&Path> {
        self.adapter_dir.as_deref()
    }

    pub fn hidden_layer(&self) -> i32 {
        self.hidden_layer
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn options(&self) -> &EncoderOptions {
        &self.opts
    }

    pub fn tokenize(&self, prompts: &[&str]) -> Result<TokenBatch> {
        self.tokenizer.encode_batch(prompts, self.max_tokens)
    }

    /// LLM hidden states for a batch (all prompts in one pass, right padded).
    pub fn hidden_states(&self, prompts: &[&str], path: ForwardMode) -> Result<HiddenStates> {
        let tokens = self.tokenize(prompts)?;
        self.hidden_states_of(tokens, path)
    }

    pub fn hidden_states_of(&self, tokens: TokenBatch, path: ForwardMode) -> Result<HiddenStates> {
        if tokens.ids.is_empty() {
            return Err(Error::Invalid("no prompts given".into()));
        }
        let vocab = self.llm.config().vocab_size;
        if let Some(&bad) = tokens
            .ids
            .iter()
            .flatten()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(Error::Tokenizer {
                path: self.tokenizer.path().to_path_buf(),
                msg: format!("produced token id {bad} but the model's vocab_size is {vocab}: tokenizer and model do not belong together"),
            });
        }
        let device = self.llm.device();
        let ids = tokens.ids_tensor(device)?;
        let states = self
            .llm
            .forward(&ids, &tokens.mask, self.hidden_layer, path)?;
        let mask = tokens.mask_tensor(device)?;
        Ok(HiddenStates {
            states,
            mask,
            tokens,
        })
    }

    /// SDXL conditioning for a batch of prompts (fast path).
    pub fn encode(&self, prompts: &[&str]) -> Result<Conditioning> {
        self.encode_with(prompts, PromptSyntax::None)
    }

    /// `encode` for prompts written in a weighting syntax: the syntax is removed before the
    /// LLM reads them, and each token's weight scales the resampler's attention to it
    /// (`Resampler::forward_weighted`). Prompts without weights give exactly `encode`'s output.
    pub fn encode_with(&self, prompts: &[&str], syntax: PromptSyntax) -> Result<Conditioning> {
        let resampler = self.resampler.as_ref().ok_or_else(|| {
            Error::Invalid(match &self.adapter_dir {
                Some(d) => format!(
                    "{} has no resampler (a bare LoRA gives hidden states only: use --dump-hidden)",
                    d.display()
                ),
                None => {
                    "no adapter loaded: SDXL conditioning needs an adapter with a resampler".into()
                }
            })
        })?;
        let (h, weights) = self.weighted_hidden_states(prompts, syntax)?;
        let (prompt_embeds, pooled) =
            resampler.forward_weighted(&h.states, &h.mask, weights.as_ref(), ForwardMode::Fast)?;
        Ok(Conditioning {
            prompt_embeds,
            pooled,
            warnings: h.tokens.warnings,
        })
    }

    /// The LLM's hidden states of prompts written in `syntax` (the syntax removed) and, when
    /// any prompt carries a weight other than 1, the `[B,T]` token weights for
    /// `Resampler::forward_weighted`.
    pub fn weighted_hidden_states(
        &self,
        prompts: &[&str],
        syntax: PromptSyntax,
    ) -> Result<(HiddenStates, Option<Tensor>)> {
        let parsed = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                WeightedPrompt::parse(p, syntax).map_err(|e| match e {
                    Error::Invalid(m) if prompts.len() > 1 => {
                        Error::Invalid(format!("prompt {i}: {m}"))
                    }
                    e => e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let texts: Vec<String> = parsed.iter().map(WeightedPrompt::text).collect();
        let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let h = self.hidden_states(&text_refs, ForwardMode::Fast)?;
        let weights = if parsed.iter().all(WeightedPrompt::is_plain) {
            None
        } else {
            Some(self.weight_tensor(&parsed, &h.tokens)?)
        };
        Ok((h, weights))
    }

    /// `[B,T]` token weights matching `tokens` (truncated as they were; 1 at padding).
    fn weight_tensor(&self, parsed: &[WeightedPrompt], tokens: &TokenBatch) -> Result<Tensor> {
        let t = tokens.ids.first().map_or(0, Vec::len);
        let mut flat = Vec::with_capacity(parsed.len() * t);
        for (p, &len) in parsed.iter().zip(&tokens.lengths) {
            let mut w = self.tokenizer.token_weights(p)?;
            w.resize(len, 1.0);
            w.resize(t, 1.0);
            flat.extend(w);
        }
        Ok(Tensor::from_vec(
            flat,
            (parsed.len(), t),
            self.llm.device(),
        )?)
    }
}
