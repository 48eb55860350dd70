//! `qwenclip train` and `qwenclip eval`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use qwenclip::data::TargetCache;
use qwenclip::sampling::PredictionType;
use qwenclip::training::run::{self, Event, Need, Resume, Run, RunSpec};
use qwenclip::training::trainer::describe_parts;
use qwenclip::training::vision::{collapse, Judge, Judging, Objective, SamplerKind};
use qwenclip::training::{EvalMetrics, Schedule, TrainConfig, Trainer};
use qwenclip::{Encoder, EncoderOptions, LoraMode};

use super::{DTypeArg, DeviceArg};

/// Settings left out take the library's defaults (listed below), or on `--resume` the run's.
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
    /// Optimizer steps in total (on --resume: a larger value extends the run).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr_lora: Option<f64>,
    #[arg(long)]
    lr_resampler: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    warmup: Option<u64>,
    /// cosine or constant
    #[arg(long)]
    schedule: Option<Schedule>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    loss_weight_embeds: Option<f64>,
    #[arg(long)]
    loss_weight_pooled: Option<f64>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    save_every: Option<u64>,
    /// Fraction of captions held out for evaluation.
    #[arg(long)]
    held_out: Option<f64>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Projections the LoRA trains (comma-separated).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// 0 = derived from the base model's width.
    #[arg(long)]
    resampler_width: Option<usize>,
    /// 0 = derived from the resampler's width.
    #[arg(long)]
    resampler_heads: Option<usize>,
    #[arg(long)]
    resampler_ff_mult: Option<usize>,
    #[arg(long)]
    resampler_layers: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// What the student learns from: mse (the teacher's outputs), vision (what the SDXL UNet
    /// predicts with them, along the teacher's sampling trajectories) or mixed.
    #[arg(long)]
    objective: Option<Objective>,
    /// The SDXL UNet that judges the student (vision, mixed): a diffusers pipeline or `unet/`
    /// folder, or a single-file SDXL checkpoint.
    #[arg(long)]
    unet: Option<PathBuf>,
    /// The teacher for the empty prompt (the unconditional branch of guidance); default: the
    /// --unet checkpoint or pipeline, which holds SDXL's text encoders too.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// epsilon or v_prediction; default: what the UNet's files say (SDXL: epsilon).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Image side in pixels for the vision objective's trajectories.
    #[arg(long)]
    resolution: Option<usize>,
    /// Denoising steps per trajectory (one training step each).
    #[arg(long)]
    denoise_steps: Option<usize>,
    /// Guidance drawn per trajectory from MIN,MAX in steps of 0.5.
    #[arg(long, value_delimiter = ',')]
    guidance_range: Option<Vec<f64>>,
    /// euler or ddim
    #[arg(long)]
    sampler: Option<SamplerKind>,
    #[arg(long)]
    lambda_vision: Option<f64>,
    /// Weight of output MSE in the mixed objective.
    #[arg(long)]
    lambda_mse: Option<f64>,
    /// LLM hidden state the resampler reads (transformers' hidden_states index).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    hidden_layer: i32,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Dtype of the frozen LLM (trainable weights are always f32).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
}

impl TrainArgs {
    /// The settings given on the command line, as the JSON object the run takes.
    fn settings(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut put = |key: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                m.insert(key.to_string(), v);
            }
        };
        use serde_json::json;
        put("steps", self.steps.map(|v| json!(v)));
        put("batch_size", self.batch_size.map(|v| json!(v)));
        put("grad_accum", self.grad_accum.map(|v| json!(v)));
        put("lr_lora", self.lr_lora.map(|v| json!(v)));
        put("lr_resampler", self.lr_resampler.map(|v| json!(v)));
        put(
            "adamw",
            self.weight_decay.map(|v| json!({ "weight_decay": v })),
        );
        put("warmup_steps", self.warmup.map(|v| json!(v)));
        put("schedule", self.schedule.map(|v| json!(v)));
        put("max_grad_norm", self.max_grad_norm.map(|v| json!(v)));
        put(
            "loss_weight_embeds",
            self.loss_weight_embeds.map(|v| json!(v)),
        );
        put(
            "loss_weight_pooled",
            self.loss_weight_pooled.map(|v| json!(v)),
        );
        put("eval_every", self.eval_every.map(|v| json!(v)));
        put("save_every", self.save_every.map(|v| json!(v)));
        put("held_out", self.held_out.map(|v| json!(v)));
        put("lora_r", self.lora_r.map(|v| json!(v)));
        put("lora_alpha", self.lora_alpha.map(|v| json!(v)));
        put("lora_targets", self.targets.as_ref().map(|v| json!(v)));
        put("resampler_width", self.resampler_width.map(|v| json!(v)));
        put("resampler_heads", self.resampler_heads.map(|v| json!(v)));
        put(
            "resampler_ff_mult",
            self.resampler_ff_mult.map(|v| json!(v)),
        );
        put("resampler_layers", self.resampler_layers.map(|v| json!(v)));
        put("seed", self.seed.map(|v| json!(v)));
        put("objective", self.objective.map(|v| json!(v)));
        let mut vision = serde_json::Map::new();
        let mut vput = |key: &str, v: Option<serde_json::Value>| {
            if let Some(v) = v {
                vision.insert(key.to_string(), v);
            }
        };
        vput("resolution", self.resolution.map(|v| json!(v)));
        vput("denoise_steps", self.denoise_steps.map(|v| json!(v)));
        if let Some(g) = &self.guidance_range {
            vput("guidance_min", Some(json!(g[0])));
            vput("guidance_max", Some(json!(g[1])));
        }
        vput("sampler", self.sampler.map(|v| json!(v)));
        vput("lambda_vision", self.lambda_vision.map(|v| json!(v)));
        vput("lambda_mse", self.lambda_mse.map(|v| json!(v)));
        if !vision.is_empty() {
            m.insert("vision".into(), serde_json::Value::Object(vision));
        }
        serde_json::Value::Object(m)
    }
}

/// The defaults table `qwenclip train --help` ends with (read from the library).
pub fn defaults_help() -> String {
    let d = serde_json::to_value(TrainConfig::default()).expect("defaults serialise");
    let mut out =
        String::from("Defaults (the library's, shared with the C ABI and the ComfyUI node):\n");
    if let Some(m) = d.as_object() {
        for (k, v) in m {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out
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
    if a.guidance_range.as_ref().is_some_and(|g| g.len() != 2) {
        bail!("--guidance-range takes two numbers, MIN,MAX (e.g. 2,5)");
    }
    let cache = TargetCache::open(&a.cache)?;
    let opts = EncoderOptions {
        device: a.device.device()?,
        dtype: a.dtype.dtype(),
        max_tokens: Some(a.max_tokens),
        hidden_layer: Some(a.hidden_layer),
        lora_mode: LoraMode::Unmerged,
    };
    let model_dir = qwenclip::hub::resolve_model(&a.model)?;
    let encoder = Encoder::load(&model_dir, a.adapter.as_deref(), opts)?;
    let d = cache.dims();
    let device = a.device.device()?;
    let judge = match &a.unet {
        Some(path) => {
            let prediction = a
                .prediction_type
                .as_deref()
                .map(|p| {
                    PredictionType::parse(p).ok_or_else(|| {
                        anyhow::anyhow!("--prediction-type {p}: expected epsilon or v_prediction")
                    })
                })
                .transpose()?;
            eprintln!("judge UNet: {}", path.display());
            Judging::Unet(Box::new(Judge::load(
                path,
                None,
                prediction,
                a.dtype.dtype(),
                &device,
            )?))
        }
        None => Judging::None,
    };
    let teacher_path = a.teacher.clone().or_else(|| a.unet.clone());
    let spec = RunSpec {
        out: a.out.clone(),
        settings: a.settings(),
        dims: d,
        resume: match &a.resume {
            Some(dir) => Resume::From(dir.clone()),
            None => Resume::Never,
        },
        judge,
    };
    let mut run = Run::open(encoder, cache.captions().to_vec(), spec)?;
    for note in run.notes() {
        eprintln!("note: {note}");
    }
    let sizes = run.trainer().save_sizes();
    eprintln!(
        "{} trainable values; each save writes {} (adapter {}, checkpoint {})",
        run.trainer().trainable_params(),
        mib(sizes.adapter_bytes + sizes.checkpoint_bytes),
        mib(sizes.adapter_bytes),
        mib(sizes.checkpoint_bytes)
    );
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
    let device = run.trainer().encoder().llm().device().clone();
    let started = Instant::now();
    let summary = run::drive(
        &mut run,
        &mut |req| match req.need {
            Need::Empty => empty_prompt_targets(teacher_path.as_deref(), &device),
            _ => cache.get_batch(&req.indices, &device),
        },
        &stop,
        &mut |ev| match ev {
            Event::Step {
                report,
                samples_per_s,
                total_steps,
            } => {
                let done = report.step as f64 / (*total_steps).max(1) as f64;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = if done > 0.0 {
                    elapsed / done * (1.0 - done)
                } else {
                    0.0
                };
                eprint!(
                    "\r{} {}/{} loss {:.5} ({}) |g| {:.3} {:.1} samples/s ETA {}   ",
                    super::bar(done),
                    report.step,
                    total_steps,
                    report.loss,
                    describe_parts(&report.parts),
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

/// The teacher's conditioning of the empty prompt (the vision objective's unconditional
/// branch), from the teacher at `path`.
fn empty_prompt_targets(
    path: Option<&std::path::Path>,
    device: &candle_core::Device,
) -> qwenclip::Result<(candle_core::Tensor, candle_core::Tensor)> {
    let path = path.ok_or_else(|| {
        qwenclip::Error::Invalid(
            "the vision objective needs the teacher's empty prompt: give --teacher (or a --unet checkpoint that holds SDXL's text encoders)".into(),
        )
    })?;
    let teacher = qwenclip::teacher::Teacher::load(path, device)?;
    let out = teacher.encode(&[""])?;
    Ok((out.prompt_embeds, out.pooled))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
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
    // A trainer with no steps is the adapter as it is; it reuses the evaluation code.
    let trainer = Trainer::new(encoder, TrainConfig::default(), d)?;
    let device = trainer.encoder().llm().device().clone();
    let mut m = EvalMetrics::default();
    let (mut student, mut teacher) = (Vec::new(), Vec::new());
    for chunk in indices.chunks(a.batch_size.max(1)) {
        let prompts: Vec<&str> = chunk
            .iter()
            .map(|&i| cache.captions()[i].as_str())
            .collect();
        let (te, tp) = cache.get_batch(chunk, &device)?;
        let (part, se, sp) = trainer.evaluate_outputs(&prompts, &te, &tp)?;
        m = m.merge(&part);
        student.extend(collapse::summaries(&se, &sp)?);
        teacher.extend(collapse::summaries(&te, &tp)?);
    }
    if student.len() >= 2 {
        m.pairwise_cos_student = Some(collapse::pairwise_cosine(&student));
        m.pairwise_cos_teacher = Some(collapse::pairwise_cosine(&teacher));
    }
    println!("| metric | value |\n|---|---|");
    println!("| captions | {} |", m.count);
    println!("| MSE prompt_embeds | {:.6} |", m.mse_embeds);
    println!("| MSE pooled | {:.6} |", m.mse_pooled);
    println!("| cosine per token | {:.5} |", m.cos_tokens);
    println!("| cosine pooled | {:.5} |", m.cos_pooled);
    if let (Some(st), Some(te)) = (m.pairwise_cos_student, m.pairwise_cos_teacher) {
        // Above 1: the student puts different prompts closer together than the teacher
        // (collapse).
        println!(
            "| pairwise cosine between prompts, student / teacher | {st:.5} / {te:.5} = {:.4} |",
            st / te
        );
    }
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
