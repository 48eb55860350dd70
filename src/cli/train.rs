//! `qwenclip train` and `qwenclip eval`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use qwenclip::data::TargetCache;
use qwenclip::training::run::{self, Event, RunOptions};
use qwenclip::training::{EvalMetrics, Schedule, TargetDims, TrainConfig, Trainer};
use qwenclip::{Encoder, EncoderOptions, LoraMode};

use super::{DTypeArg, DeviceArg};

#[derive(Args)]
pub struct TrainArgs {
    /// Base model folder or hub id.
    #[arg(long)]
    model: String,
    /// Target cache made by `qwenclip cache-targets`.
    #[arg(long)]
    cache: PathBuf,
    /// Output folder: checkpoint.safetensors, adapter/, metrics.jsonl, loss.png.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run whose checkpoint is in this folder (exactly where it stopped).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start from this adapter instead of fresh LoRA + resampler.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Optimizer steps in total.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr_lora: f64,
    #[arg(long, default_value_t = 5e-4)]
    lr_resampler: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// cosine or constant
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 1.0)]
    loss_weight_embeds: f64,
    #[arg(long, default_value_t = 1.0)]
    loss_weight_pooled: f64,
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    #[arg(long, default_value_t = 200)]
    save_every: u64,
    /// Fraction of captions held out for evaluation.
    #[arg(long, default_value_t = 0.05)]
    held_out: f64,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    targets: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    resampler_width: usize,
    #[arg(long, default_value_t = 16)]
    resampler_heads: usize,
    #[arg(long, default_value_t = 4)]
    resampler_ff_mult: usize,
    #[arg(long, default_value_t = 4)]
    resampler_layers: usize,
    /// LLM hidden state the resampler reads (transformers' hidden_states index).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    hidden_layer: i32,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Dtype of the frozen LLM (trainable weights are always f32).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    cache: PathBuf,
    /// The held-out split to score (same fraction and seed as training); 0 scores every caption.
    #[arg(long, default_value_t = 0.05)]
    held_out: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let cache = TargetCache::open(&a.cache)?;
    let schedule: Schedule = a.schedule.parse().map_err(anyhow::Error::msg)?;
    let opts = EncoderOptions {
        device: a.device.device()?,
        dtype: a.dtype.dtype(),
        max_tokens: Some(a.max_tokens),
        hidden_layer: Some(a.hidden_layer),
        lora_mode: LoraMode::Unmerged,
    };
    let model_dir = qwenclip::hub::resolve_model(&a.model)?;
    let encoder = Encoder::load(&model_dir, a.adapter.as_deref(), opts)?;
    let cfg = TrainConfig {
        lr_lora: a.lr_lora,
        lr_resampler: a.lr_resampler,
        adamw: qwenclip::training::optim::AdamWConfig {
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        schedule,
        warmup_steps: a.warmup,
        total_steps: a.steps,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        loss_weight_embeds: a.loss_weight_embeds,
        loss_weight_pooled: a.loss_weight_pooled,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        lora_targets: a.targets.clone(),
        use_rslora: false,
        resampler_width: a.resampler_width,
        resampler_heads: a.resampler_heads,
        resampler_ff_mult: a.resampler_ff_mult,
        resampler_layers: a.resampler_layers,
        seed: a.seed,
    };
    let run_opts = RunOptions {
        out: a.out.clone(),
        steps: a.steps,
        batch_size: a.batch_size,
        held_out: a.held_out,
        eval_every: a.eval_every,
        save_every: a.save_every,
        eval_batch_size: a.batch_size.max(8),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\nCtrl-C: saving a checkpoint after the current step (press again to quit now)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    eprintln!(
        "training on {} captions from {} -> {}",
        cache.len(),
        a.cache.display(),
        a.out.display()
    );
    let started = Instant::now();
    let summary = run::train(
        encoder,
        &cache,
        cfg,
        &run_opts,
        a.resume.as_deref(),
        &stop,
        &mut |ev| match ev {
            Event::Step {
                report,
                samples_per_s,
                total_steps,
            } => {
                let done = report.step as f64 / total_steps.max(1) as f64;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = if done > 0.0 {
                    elapsed / done * (1.0 - done)
                } else {
                    0.0
                };
                eprint!(
                "\r{} {}/{} loss {:.5} (embeds {:.5}, pooled {:.5}) |g| {:.3} {:.1} samples/s ETA {}   ",
                super::bar(done),
                report.step,
                total_steps,
                report.loss,
                report.loss_embeds,
                report.loss_pooled,
                report.grad_norm.unwrap_or(0.0),
                samples_per_s,
                super::hms(eta)
            );
            }
            Event::Eval { step, metrics } => {
                eprintln!("\nstep {step} held-out: {}", one_line(metrics))
            }
            Event::Saved { step, path } => eprintln!(
                "\nstep {step}: checkpoint and adapter saved in {}",
                path.display()
            ),
        },
    )?;
    eprintln!();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if summary.interrupted {
        eprintln!("interrupted: resume with --resume {}", a.out.display());
    } else {
        eprintln!("adapter: {}", summary.adapter.display());
    }
    Ok(())
}

fn one_line(m: &EvalMetrics) -> String {
    format!(
        "mse embeds {:.5} pooled {:.5}, cosine tokens {:.4} pooled {:.4} ({} captions)",
        m.mse_embeds, m.mse_pooled, m.cos_tokens, m.cos_pooled, m.count
    )
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let cache = TargetCache::open(&a.cache)?;
    let opts = EncoderOptions {
        device: a.device.device()?,
        dtype: a.dtype.dtype(),
        ..Default::default()
    };
    let model_dir = qwenclip::hub::resolve_model(&a.model)?;
    let encoder = Encoder::load(&model_dir, Some(&a.adapter), opts)?;
    let Some(r) = encoder.resampler() else {
        bail!(
            "{}: no resampler in this adapter, nothing to evaluate",
            a.adapter.display()
        );
    };
    let d = cache.dims();
    let rc = r.config();
    if (rc.num_latents, rc.output_dim, rc.pooled_dim) != (d.seq, d.embed, d.pooled) {
        bail!(
            "the adapter outputs [{}, {}] + [{}] but the cache holds [{}, {}] + [{}]",
            rc.num_latents,
            rc.output_dim,
            rc.pooled_dim,
            d.seq,
            d.embed,
            d.pooled
        );
    }
    let indices = if a.held_out > 0.0 {
        cache.split(a.held_out, a.seed).1
    } else {
        (0..cache.len()).collect()
    };
    let dims = TargetDims {
        seq: d.seq,
        embed: d.embed,
        pooled: d.pooled,
    };
    // A trainer with no steps is the adapter as it is; it reuses the evaluation code.
    let trainer = Trainer::new(encoder, TrainConfig::default(), dims)?;
    let m = run::evaluate(
        &trainer,
        &cache,
        &indices,
        a.batch_size,
        trainer.encoder().llm().device(),
    )?;
    println!("| metric | value |\n|---|---|");
    println!("| captions | {} |", m.count);
    println!("| MSE prompt_embeds | {:.6} |", m.mse_embeds);
    println!("| MSE pooled | {:.6} |", m.mse_pooled);
    println!("| cosine per token | {:.5} |", m.cos_tokens);
    println!("| cosine pooled | {:.5} |", m.cos_pooled);
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
