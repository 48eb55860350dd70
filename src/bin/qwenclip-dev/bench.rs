//! `qwenclip-dev bench-encode`: LLM hidden-state latency for given batch sizes and lengths,
//! and the process's peak resident memory, as JSON (`bench-train`, below, times training
//! steps). `tests/reference/bench_encode.py` runs this and `transformers` on the same weights
//! in one command and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use qwenclip::llm::Qwen3;
use qwenclip::rng::Rng;
use qwenclip::ForwardMode;

use crate::shared::args::{DTypeArg, DeviceArg};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "77,256")]
    tokens: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// With a .gguf model: afterwards, time the f32 path (the same weights dequantized) on
    /// the first N layers against the quantized model stopped after the same N layers
    /// (alternating runs), and extrapolate the f32 latency to the whole model (a Qwen3-4B in
    /// f32 is 16 GB). The peak memory reported is measured before this comparison.
    #[arg(long)]
    compare_f32_layers: Option<usize>,
    /// A JSON file holding a list of token-id lists: encode each (batch 1) instead of random
    /// ids of `--batches` x `--tokens` (`tests/reference/bench_llamacpp.py` feeds llama.cpp
    /// the same ids).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Write each input's last hidden states (after the final norm, f32) to this
    /// safetensors file as `hidden.N` `[batch, tokens, hidden]`, in input order.
    #[arg(long)]
    hidden_out: Option<PathBuf>,
}

/// The inputs to time: the ids of `--ids` (batch 1 each), or seeded random ids of every
/// `--batches` x `--tokens`.
fn bench_inputs(a: &BenchArgs, vocab: usize) -> Result<Vec<Vec<Vec<u32>>>> {
    if let Some(path) = &a.ids {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let lists: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: expected a JSON list of token-id lists: {e}",
                path.display()
            )
        })?;
        anyhow::ensure!(
            lists.iter().all(|l| !l.is_empty()),
            "{}: an empty token-id list",
            path.display()
        );
        return Ok(lists.into_iter().map(|l| vec![l]).collect());
    }
    let mut rng = Rng::new(7);
    let mut inputs = Vec::new();
    for &b in &a.batches {
        for &t in &a.tokens {
            inputs.push(
                (0..b)
                    .map(|_| (0..t).map(|_| rng.below(vocab) as u32).collect())
                    .collect(),
            );
        }
    }
    Ok(inputs)
}

/// Median and minimum latency (ms) of `reps` encodes after one warm-up.
fn time_forward(
    llm: &Qwen3,
    ids: &candle_core::Tensor,
    mask: &[Vec<u8>],
    layer: i32,
    reps: usize,
) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for rep in 0..=reps {
        let s = Instant::now();
        let h = llm.forward(ids, mask, layer, ForwardMode::Fast)?;
        llm.device().synchronize()?;
        drop(h);
        if rep > 0 {
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// Latency (ms) of one encode.
fn time_once(llm: &Qwen3, ids: &candle_core::Tensor, mask: &[Vec<u8>], layer: i32) -> Result<f64> {
    let s = Instant::now();
    let h = llm.forward(ids, mask, layer, ForwardMode::Fast)?;
    llm.device().synchronize()?;
    drop(h);
    Ok(s.elapsed().as_secs_f64() * 1e3)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let device = a.device.device()?;
    let t0 = Instant::now();
    let llm = Qwen3::load(&a.model, a.dtype.dtype(), &device)?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = llm.config().vocab_size.min(150_000);
    let layers = llm.config().num_hidden_layers;
    let mut inputs = Vec::new();
    let mut results = Vec::new();
    let mut hidden = Vec::new();
    for rows in bench_inputs(&a, vocab)? {
        let (b, t) = (rows.len(), rows[0].len());
        anyhow::ensure!(
            rows.iter().all(|r| r.len() == t),
            "a batch of unequal lengths"
        );
        let ids = candle_core::Tensor::from_vec(rows.concat(), (b, t), &device)?;
        let mask = vec![vec![1u8; t]; b];
        let (median, min) = time_forward(&llm, &ids, &mask, -1, a.reps)?;
        results.push(serde_json::json!({
            "batch": b, "tokens": t, "median_ms": median, "min_ms": min,
        }));
        if a.hidden_out.is_some() {
            let h = llm.forward(&ids, &mask, -1, ForwardMode::Fast)?;
            hidden.push((
                format!("hidden.{}", hidden.len()),
                h.to_dtype(candle_core::DType::F32)?,
            ));
        }
        inputs.push((b, t, ids, mask));
    }
    let peak = peak_rss_bytes();
    if let Some(path) = &a.hidden_out {
        candle_core::safetensors::save(
            &hidden
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
            path,
        )?;
    }
    let mut report = serde_json::json!({
        "impl": "qwenclip", "load_s": load_s, "results": results,
        "peak_rss_bytes": peak,
        "weight_bytes": llm.weight_bytes(),
        "quantized": llm.is_quantized(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_gemm": qwenclip::ops::blas::describe(),
    });
    if let Some(n) = a.compare_f32_layers {
        anyhow::ensure!(
            qwenclip::formats::gguf::is_gguf(&a.model),
            "--compare-f32-layers needs a .gguf model"
        );
        let n = n.clamp(1, layers);
        let opts = qwenclip::llm::GgufOptions {
            dequantize: true,
            max_layers: Some(n),
        };
        let dense = Qwen3::load_gguf(&a.model, candle_core::DType::F32, &device, opts)?;
        let mut rows = Vec::new();
        // Quantized and f32 runs alternate, and each keeps its fastest: on a shared machine
        // that compares the least disturbed run of each under the same conditions.
        for (b, t, ids, mask) in &inputs {
            time_once(&dense, ids, mask, n as i32)?; // warm-up (the quantized one is warm)
            let (mut q_min, mut f_min) = (f64::MAX, f64::MAX);
            for _ in 0..a.reps.max(1) {
                q_min = q_min.min(time_once(&llm, ids, mask, n as i32)?);
                f_min = f_min.min(time_once(&dense, ids, mask, n as i32)?);
            }
            eprintln!(
                "batch {b} x {t} tokens, first {n} of {layers} layers (fastest of {} alternating runs): quantized {q_min:.0} ms, f32 {f_min:.0} ms (quantized / f32 = {:.2}); whole model: f32 ~{:.0} ms (extrapolated)",
                a.reps.max(1),
                q_min / f_min,
                f_min * layers as f64 / n as f64
            );
            rows.push(serde_json::json!({
                "batch": b, "tokens": t, "layers": n,
                "quantized_min_ms": q_min, "f32_min_ms": f_min,
                "quantized_over_f32": q_min / f_min,
                "f32_whole_model_ms_extrapolated": f_min * layers as f64 / n as f64,
            }));
        }
        report["f32_compare"] = serde_json::json!(rows);
    }
    eprintln!(
        "peak resident memory {:.2} GB (weights {:.2} GB)",
        peak as f64 / 1e9,
        report["weight_bytes"].as_u64().unwrap_or(0) as f64 / 1e9
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `VmHWM` of this process (Linux), 0 elsewhere.
fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// A memory line of `/proc/self/status` (`VmRSS:`, `VmHWM:`) in bytes (Linux), 0 elsewhere.
pub fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 77)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 1024)]
    resampler_width: usize,
    #[arg(long, default_value_t = 16)]
    resampler_heads: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// mse, or vision: each step also runs the teacher's guided prediction (two UNet
    /// forwards, no gradient) and the student's prediction through the UNet, backpropagated.
    #[arg(long, default_value = "mse")]
    objective: String,
    /// The judge UNet for `--objective vision` (`random-unet --shape sdxl` writes one).
    #[arg(long)]
    unet: Option<PathBuf>,
    /// Vision: image side in pixels (latents are 1/8 of it).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Vision: the trajectory's denoising steps; the step timed is the middle one.
    #[arg(long, default_value_t = 20)]
    denoise_steps: usize,
    /// Vision: keep every UNet activation for the backward instead of recomputing by block.
    #[arg(long)]
    no_checkpointing: bool,
}

/// One training step (LLM + LoRA forward/backward, resampler, AdamW) per rep on random
/// targets; prompts of exactly `tokens` tokens (" a" repeated: one Qwen token each). With
/// `--objective vision`, the vision-distillation step of the training run instead: at the
/// middle denoising step of a trajectory, the teacher's conditional and unconditional UNet
/// predictions (no gradient, guidance 5), the student's prediction, their MSE, backward
/// through the UNet into resampler and LoRA, AdamW.
pub fn run_train(a: BenchTrainArgs) -> Result<()> {
    use qwenclip::training::{TargetDims, TrainConfig, Trainer};
    let device = a.device.device()?;
    let opts = qwenclip::EncoderOptions {
        device: device.clone(),
        max_tokens: Some(a.tokens),
        ..Default::default()
    };
    let encoder = qwenclip::Encoder::load(&a.model, None, opts)?;
    let cfg = TrainConfig {
        lora_r: a.lora_r,
        lora_alpha: a.lora_r as f64,
        resampler_width: a.resampler_width,
        resampler_heads: a.resampler_heads,
        ..Default::default()
    };
    let dims = TargetDims::SDXL;
    let mut trainer = Trainer::new(encoder, cfg, dims)?;
    let prompt = format!("a{}", " a".repeat(a.tokens - 1));
    let n = trainer.encoder().tokenize(&[prompt.as_str()])?.lengths[0];
    anyhow::ensure!(
        n == a.tokens,
        "the bench prompt has {n} tokens, wanted {}",
        a.tokens
    );
    let prompts = vec![prompt.as_str(); a.batch];
    let mut rng = Rng::new(1);
    let te = candle_core::Tensor::from_vec(
        rng.normal_vec(a.batch * dims.seq * dims.embed, 1.0),
        (a.batch, dims.seq, dims.embed),
        &device,
    )?;
    let tp = candle_core::Tensor::from_vec(
        rng.normal_vec(a.batch * dims.pooled, 1.0),
        (a.batch, dims.pooled),
        &device,
    )?;
    let vision = match a.objective.as_str() {
        "mse" => None,
        "vision" => {
            let unet = a
                .unet
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--objective vision needs --unet"))?;
            Some(VisionBench::new(unet, &a, &device, &mut rng)?)
        }
        o => anyhow::bail!("--objective {o}: expected mse or vision"),
    };
    let mut times = Vec::new();
    for rep in 0..=a.reps {
        let s = Instant::now();
        match &vision {
            Some(v) => v.step(&mut trainer, &prompts, (&te, &tp))?,
            None => trainer.step(&prompts, &te, &tp).map(drop)?,
        }
        device.synchronize()?;
        if rep > 0 {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let report = serde_json::json!({
        "impl": "qwenclip", "objective": a.objective, "resolution": a.resolution,
        "checkpointing": !a.no_checkpointing,
        "batch": a.batch, "tokens": a.tokens, "median_step_s": median,
        "samples_per_s": a.batch as f64 / median, "peak_rss_bytes": peak_rss_bytes(),
        "trainable_params": trainer.trainable_params(),
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The judge and the fixed inputs of a timed vision step (random latents at the middle step
/// of a trajectory, a random unconditional branch).
struct VisionBench {
    judge: qwenclip::training::vision::Judge,
    sampler: Box<dyn qwenclip::sampling::Sampler>,
    step: usize,
    latents: candle_core::Tensor,
    time_ids: candle_core::Tensor,
    uncond: (candle_core::Tensor, candle_core::Tensor),
    guidance: Vec<f64>,
}

impl VisionBench {
    fn new(
        unet: &std::path::Path,
        a: &BenchTrainArgs,
        device: &candle_core::Device,
        rng: &mut Rng,
    ) -> Result<Self> {
        use candle_core::{DType, Tensor};
        use qwenclip::training::vision::{Judge, SamplerKind};
        let mut judge = Judge::load(unet, None, None, DType::F32, device)?;
        judge.unet.set_checkpointing(!a.no_checkpointing);
        let sampler = judge.sampler(SamplerKind::Euler, a.denoise_steps)?;
        let step = a.denoise_steps / 2;
        let (n, c, h, w) = judge.latent_shape(a.batch, a.resolution);
        let latents = Tensor::from_vec(rng.normal_vec(n * c * h * w, 1.0), (n, c, h, w), device)?;
        let dims = qwenclip::training::TargetDims::SDXL;
        let uncond = (
            Tensor::from_vec(
                rng.normal_vec(dims.seq * dims.embed, 1.0),
                (1, dims.seq, dims.embed),
                device,
            )?,
            Tensor::from_vec(rng.normal_vec(dims.pooled, 1.0), (1, dims.pooled), device)?,
        );
        let time_ids = judge.time_ids(a.batch, a.resolution)?;
        Ok(Self {
            judge,
            sampler,
            step,
            latents,
            time_ids,
            uncond,
            guidance: vec![5.0; a.batch],
        })
    }

    fn step(
        &self,
        trainer: &mut qwenclip::training::Trainer,
        prompts: &[&str],
        teacher: (&candle_core::Tensor, &candle_core::Tensor),
    ) -> Result<()> {
        use qwenclip::training::vision::vision_loss;
        let (want, _next) = self.judge.teacher_step(
            self.sampler.as_ref(),
            self.step,
            &self.latents,
            &self.time_ids,
            teacher,
            (&self.uncond.0, &self.uncond.1),
            &self.guidance,
        )?;
        trainer.step_with(prompts, |e, p| {
            let got = self.judge.predict(
                self.sampler.as_ref(),
                self.step,
                &self.latents,
                &self.time_ids,
                (e, p),
                ForwardMode::Differentiable,
            )?;
            Ok(qwenclip::training::Loss {
                total: vision_loss(&got, &want)?,
                parts: Vec::new(),
            })
        })?;
        Ok(())
    }
}
