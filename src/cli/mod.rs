//! Subcommands. Each parses its flags into library calls and prints what a user needs.
//! (The developer tools, `tiny`, `random-model` and the benchmarks, are `qwenclip-dev`:
//! `src/bin/qwenclip-dev/`.)

mod cache;
mod encode;
mod info;
pub mod shared;
mod teacher;
mod train;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use shared::args::{DTypeArg, DeviceArg};

#[derive(Parser)]
#[command(
    name = "qwenclip",
    version,
    about = "Qwen3 + LoRA + Perceiver Resampler text encoder for SDXL"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode prompts into SDXL conditioning (prompt_embeds [B,77,2048], pooled_prompt_embeds [B,1280]).
    Encode(encode::EncodeArgs),
    /// Describe a model folder, a .gguf file, an adapter folder, or a weights file.
    Info { path: PathBuf },
    /// Quantize a Hugging Face Qwen3 folder into one GGUF file (llama.cpp names and metadata, tokenizer embedded).
    Quantize {
        /// Model folder or hub id.
        #[arg(long)]
        model: String,
        /// Type of the decoder projections: q4_k, q5_k, q6_k, q8_0, q4_0, f16, f32.
        #[arg(long = "type", default_value = "q4_k")]
        qtype: String,
        /// Type of the token embedding (and lm_head of untied models).
        #[arg(long, default_value = "q8_0")]
        embed_type: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert a PyTorch `.pth` resampler into `resampler.safetensors` through a key map.
    ImportResampler {
        #[arg(long)]
        pth: PathBuf,
        /// JSON key map (docs/adapter-format.md); without it keys are taken as they are.
        #[arg(long)]
        key_map: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode prompts with SDXL's own text encoders (CLIP-L + CLIP-G): the distillation teacher.
    Teacher(teacher::TeacherArgs),
    /// Cache the teacher's outputs for a caption set (stage 1 of distillation).
    CacheTargets(cache::CacheArgs),
    /// Train LoRA + resampler to reproduce a target cache (distillation).
    Train(Box<train::TrainArgs>),
    /// Held-out metrics of an adapter against a target cache, as a table and JSON.
    Eval(train::EvalArgs),
}

/// Parses the command line; `train --help` ends with the library's defaults.
pub fn parse() -> Cli {
    let cmd = Cli::command().mut_subcommand("train", |c| c.after_help(train::defaults_help()));
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Encode(a) => encode::run(a),
        Command::Info { path } => info::run(&path),
        Command::Quantize {
            model,
            qtype,
            embed_type,
            out,
        } => {
            use qwenclip::formats::gguf::parse_type;
            use qwenclip::llm::quantize::{quantize_model, QuantizeSpec};
            let dir = qwenclip::hub::resolve_model(&model)?;
            if qwenclip::formats::gguf::is_gguf(&dir) {
                bail!(
                    "{}: already a GGUF file; --model takes a Hugging Face folder",
                    dir.display()
                );
            }
            let spec = QuantizeSpec {
                linear: parse_type(&qtype)?,
                embedding: parse_type(&embed_type)?,
            };
            let t0 = std::time::Instant::now();
            let r = quantize_model(&dir, spec, &out)?;
            println!(
                "wrote {}: {} tensors, projections {}, embeddings {}, {:.1} MB in {:.1} s",
                out.display(),
                r.tensors,
                qtype,
                embed_type,
                r.bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64()
            );
            if r.fallbacks > 0 {
                println!(
                    "note: {} tensors have rows that are not a whole number of {qtype} blocks and were stored as Q8_0 or F32",
                    r.fallbacks
                );
            }
            for n in r.notes {
                println!("note: {n}");
            }
            Ok(())
        }
        Command::ImportResampler { pth, key_map, out } => {
            let map = match key_map {
                Some(p) => qwenclip::formats::pth::KeyMap::load(&p)?,
                None => Default::default(),
            };
            let r = qwenclip::resampler::pth::load_resampler(&pth, &map, &Device::Cpu)?;
            r.save(&out)?;
            println!(
                "{} -> {} ({} parameters, config {})",
                pth.display(),
                out.display(),
                r.config().parameter_count(),
                serde_json::to_string(r.config())?
            );
            Ok(())
        }
        Command::Teacher(a) => teacher::run(a),
        Command::CacheTargets(a) => cache::run(a),
        Command::Train(a) => train::run_train(*a),
        Command::Eval(a) => train::run_eval(a),
    }
}

/// `[=====>    ]` for a fraction in 0..=1: a `=` per whole twentieth, then the head.
pub fn bar(done: f64) -> String {
    const WIDTH: usize = 20;
    let filled = ((done.clamp(0.0, 1.0) * WIDTH as f64).floor() as usize).min(WIDTH);
    let mut cells = "=".repeat(filled);
    if filled < WIDTH {
        cells.push('>');
        cells.push_str(&" ".repeat(WIDTH - filled - 1));
    }
    format!("[{cells}]")
}

/// Seconds as `h:mm:ss` or `m:ss`.
pub fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}
