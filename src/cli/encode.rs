//! `qwenclip encode`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use qwenclip::tokenizer::syntax::PromptSyntax;
use qwenclip::{Encoder, EncoderOptions, ForwardMode};

use super::{DTypeArg, DeviceArg};

#[derive(Args)]
pub struct EncodeArgs {
    /// Model folder (config.json, tokenizer.json, *.safetensors), a llama.cpp .gguf file, or hub id (Qwen/Qwen3-4B).
    #[arg(long)]
    model: String,
    /// Adapter bundle folder, or a bare PEFT LoRA folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A prompt; repeat for a batch. "" is the empty prompt.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Output .safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Also write llm_hidden_states [B,T,H] and attention_mask [B,T].
    #[arg(long)]
    dump_hidden: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Token limit (default: the adapter's, else 256).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Prompt weighting: comfy (ComfyUI's `(word:1.2)`, `(word)`), a1111 (also `[word]`), or
    /// none (the prompt is plain text).
    #[arg(long, default_value = "none", value_parser = ["comfy", "a1111", "none"])]
    prompt_syntax: String,
}

pub fn run(a: EncodeArgs) -> Result<()> {
    let model_dir = qwenclip::hub::resolve_model(&a.model)?;
    let opts = EncoderOptions {
        device: a.device.device()?,
        dtype: a.dtype.dtype(),
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    let enc = Encoder::load(&model_dir, a.adapter.as_deref(), opts)?;
    let prompts: Vec<&str> = a.prompts.iter().map(String::as_str).collect();
    let mut out = HashMap::new();
    let has_resampler = enc.resampler().is_some();
    if !has_resampler && !a.dump_hidden {
        bail!(
            "{}: no resampler, so no SDXL conditioning can be made; pass --dump-hidden to write the LLM hidden states",
            a.adapter.as_ref().map_or("no --adapter given".to_string(), |p| p.display().to_string())
        );
    }
    let syntax: PromptSyntax = a.prompt_syntax.parse()?;
    let (h, weights) = enc.weighted_hidden_states(&prompts, syntax)?;
    for w in &h.tokens.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(r) = enc.resampler() {
        let (embeds, pooled) =
            r.forward_weighted(&h.states, &h.mask, weights.as_ref(), ForwardMode::Fast)?;
        out.insert("prompt_embeds".to_string(), embeds);
        out.insert("pooled_prompt_embeds".to_string(), pooled);
    }
    if a.dump_hidden {
        out.insert(
            "llm_hidden_states".to_string(),
            h.states.to_dtype(DType::F32)?,
        );
        out.insert("attention_mask".to_string(), h.mask.clone());
    }
    qwenclip::formats::save_atomic(&out, None, &a.out)?;
    let mut names: Vec<String> = out
        .iter()
        .map(|(k, v)| format!("{k} {:?}", v.dims()))
        .collect();
    names.sort();
    println!("wrote {}: {}", a.out.display(), names.join(", "));
    Ok(())
}
