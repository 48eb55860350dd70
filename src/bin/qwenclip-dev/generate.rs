//! `qwenclip-dev tiny` and `qwenclip-dev random-model`: the seeded models of the tests, the
//! smoke run and the benchmarks ([`qwenclip::dev::tiny`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use qwenclip::dev::tiny;

use crate::shared::args::DTypeArg;

#[derive(Args)]
pub struct TinyArgs {
    #[arg(long)]
    out: PathBuf,
    /// A Qwen `tokenizer.json` for the model folder (default: the built-in Qwen3 one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct RandomModelArgs {
    /// tiny, tiny256, qwen3-0.6b, qwen3-1.7b, qwen3-4b
    #[arg(long)]
    shape: String,
    #[arg(long)]
    out: PathBuf,
    /// A Qwen `tokenizer.json` for the model (default: the built-in Qwen3 one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write one GGUF file (OUT is the file) quantized to this type (q4_k, q8_0, ...;
    /// embeddings q8_0) instead of a safetensors folder: no f32 copy of the model is made.
    #[arg(long)]
    gguf: Option<String>,
}

#[derive(Args)]
pub struct RandomUnetArgs {
    /// sdxl, tiny
    #[arg(long, default_value = "sdxl")]
    shape: String,
    /// The diffusers `unet/` folder to write (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The bytes of `--tokenizer`, else of the built-in Qwen3 `tokenizer.json`.
fn tokenizer_json(path: Option<&Path>) -> Result<Cow<'static, [u8]>> {
    Ok(match path {
        Some(p) => Cow::Owned(std::fs::read(p).with_context(|| format!("{}", p.display()))?),
        None => Cow::Borrowed(qwenclip::dev::QWEN_TOKENIZER),
    })
}

pub fn run_tiny(a: TinyArgs) -> Result<()> {
    let tokenizer = tokenizer_json(a.tokenizer.as_deref())?;
    tiny::write_tiny(&a.out, &tokenizer, a.seed)?;
    tiny::write_tiny_teacher(&a.out.join("teacher"), a.seed)?;
    tiny::unet::write_unet(
        &tiny::unet::tiny_judge_shape(),
        &a.out.join("unet"),
        tiny::unet::UNetFileLayout::Diffusers,
        candle_core::DType::F32,
        a.seed,
    )?;
    println!(
        "tiny model: {}\ntiny adapter: {}\ntiny SDXL teacher: {}\ntiny SDXL UNet (the teacher's widths): {}",
        a.out.join("model").display(),
        a.out.join("adapter").display(),
        a.out.join("teacher").display(),
        a.out.join("unet").display()
    );
    Ok(())
}

pub fn run_random_model(a: RandomModelArgs) -> Result<()> {
    let cfg = tiny::shape(&a.shape)?;
    let tokenizer = tokenizer_json(a.tokenizer.as_deref())?;
    if let Some(t) = a.gguf {
        use qwenclip::llm::quantize::QuantizeSpec;
        let spec = QuantizeSpec {
            linear: qwenclip::formats::gguf::parse_type(&t)?,
            embedding: candle_core::quantized::GgmlDType::Q8_0,
        };
        tiny::write_gguf_model(&cfg, &a.out, Some(&tokenizer), spec, a.seed)?;
        println!("{} with random weights, {t}: {}", a.shape, a.out.display());
        return Ok(());
    }
    tiny::write_model(&cfg, &a.out, &tokenizer, a.dtype.dtype(), a.seed)?;
    println!("{} with random weights: {}", a.shape, a.out.display());
    Ok(())
}

pub fn run_random_unet(a: RandomUnetArgs) -> Result<()> {
    let cfg = tiny::unet::unet_shape(&a.shape)?;
    tiny::unet::write_unet(
        &cfg,
        &a.out,
        tiny::unet::UNetFileLayout::Diffusers,
        candle_core::DType::F32,
        a.seed,
    )?;
    println!("{} UNet with random weights: {}", a.shape, a.out.display());
    Ok(())
}
