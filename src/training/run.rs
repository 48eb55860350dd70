//! The whole training run over a target cache: data order, held-out evaluation, metrics,
//! loss curve, checkpoints, resume, NaN and Ctrl-C handling. What `qwenclip train` runs.
//!
//! Files in the output folder:
//! `checkpoint.safetensors` (latest, atomic), `adapter/` (refreshed at every checkpoint and at
//! the end), `metrics.jsonl` (one line per optimizer step, evaluation and event), `loss.png`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::plot::{write_loss_png, Series};
use super::trainer::{EvalMetrics, StepReport, TargetDims, TrainConfig, Trainer};
use crate::conditioning::Encoder;
use crate::data::TargetCache;
use crate::error::{Error, Result};
use crate::rng::Rng;

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PNG: &str = "loss.png";
pub const ADAPTER_DIR: &str = "adapter";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Optimizer steps to reach (a resumed run counts the steps already taken).
    pub steps: u64,
    pub batch_size: usize,
    /// Fraction of the cache held out for evaluation.
    pub held_out: f64,
    /// Evaluate every N optimizer steps (0: only at the start and the end).
    pub eval_every: u64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub save_every: u64,
    pub eval_batch_size: usize,
}

/// The loop's own state, saved in every checkpoint next to the trainer's.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    rng: Rng,
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    held_out: Vec<usize>,
    batch_size: usize,
}

/// What a caller (the CLI) is told as the run goes.
pub enum Event<'a> {
    Step {
        report: &'a StepReport,
        samples_per_s: f64,
        total_steps: u64,
    },
    Eval {
        step: u64,
        metrics: &'a EvalMetrics,
    },
    Saved {
        step: u64,
        path: &'a Path,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub baseline_mean: EvalMetrics,
    pub first_eval: EvalMetrics,
    pub final_eval: EvalMetrics,
    pub interrupted: bool,
    pub adapter: PathBuf,
}

/// Trains (or resumes, when `resume` names a folder with a checkpoint) until `opts.steps`
/// optimizer steps, or until `stop` is set (then saves and returns `interrupted`).
pub fn train(
    encoder: Encoder,
    cache: &TargetCache,
    cfg: TrainConfig,
    opts: &RunOptions,
    resume: Option<&Path>,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunSummary> {
    if opts.batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let dims = cache.dims();
    let dims = TargetDims {
        seq: dims.seq,
        embed: dims.embed,
        pooled: dims.pooled,
    };
    let device = encoder.llm().device().clone();
    let (mut trainer, mut state) = match resume {
        Some(dir) => {
            let ckpt = checkpoint_path(dir);
            if !ckpt.is_file() {
                return Err(Error::format(
                    dir,
                    format!("no {CHECKPOINT_FILE} to resume from"),
                ));
            }
            let (t, extra) = Trainer::resume(encoder, &ckpt)?;
            let state: LoopState = serde_json::from_value(extra)
                .map_err(|e| Error::format(&ckpt, format!("loop state: {e}")))?;
            if state
                .order
                .iter()
                .chain(&state.held_out)
                .any(|&i| i >= cache.len())
            {
                return Err(Error::format(
                    &ckpt,
                    format!(
                        "its data order does not fit this cache of {} captions",
                        cache.len()
                    ),
                ));
            }
            truncate_metrics(&opts.out.join(METRICS_FILE), t.step_count())?;
            (t, state)
        }
        None => {
            let (train_idx, held_out) = cache.split(opts.held_out, cfg.seed);
            if train_idx.is_empty() {
                return Err(Error::Invalid(format!(
                    "the cache at {} has no captions left for training",
                    cache.dir().display()
                )));
            }
            let mut rng = Rng::new(cfg.seed ^ 0x5EED);
            let mut order = train_idx;
            rng.shuffle(&mut order);
            let t = Trainer::new(encoder, cfg, dims)?;
            let _ = std::fs::remove_file(opts.out.join(METRICS_FILE));
            (
                t,
                LoopState {
                    rng,
                    order,
                    pos: 0,
                    epoch: 0,
                    held_out,
                    batch_size: opts.batch_size,
                },
            )
        }
    };
    let metrics_path = opts.out.join(METRICS_FILE);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut log = |v: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{v}").map_err(|e| Error::io(&metrics_path, e))
    };

    let baseline_mean = mean_baseline(cache, &state.order, &state.held_out, &device)?;
    let first_eval = evaluate(
        &trainer,
        cache,
        &state.held_out,
        opts.eval_batch_size,
        &device,
    )?;
    if trainer.step_count() == 0 {
        log(serde_json::json!({"baseline_mean": baseline_mean}))?;
        log(serde_json::json!({"step": 0, "eval": first_eval}))?;
        on_event(Event::Eval {
            step: 0,
            metrics: &first_eval,
        });
    }
    let mut last_eval = first_eval.clone();
    let start = Instant::now();
    let mut interrupted = false;
    let mut micro_losses: Vec<StepReport> = Vec::new();
    while trainer.step_count() < opts.steps {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let batch = next_batch(&mut state, opts.batch_size);
        let prompts: Vec<&str> = batch
            .iter()
            .map(|&i| cache.captions()[i].as_str())
            .collect();
        let (te, tp) = cache.get_batch(&batch, &device)?;
        let t0 = Instant::now();
        let report = match trainer.step(&prompts, &te, &tp) {
            Ok(r) => r,
            Err(e @ Error::NonFinite(_)) => {
                log(serde_json::json!({"step": trainer.step_count(), "error": e.to_string()}))?;
                let ckpt = checkpoint_path(&opts.out);
                let kept = if ckpt.is_file() {
                    format!("the last good checkpoint is kept: {}", ckpt.display())
                } else {
                    "no checkpoint was written before it".to_string()
                };
                return Err(Error::NonFinite(format!("{e}; {kept}")));
            }
            Err(e) => return Err(e),
        };
        let samples_per_s = batch.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        micro_losses.push(report.clone());
        if !report.optimizer_stepped {
            continue;
        }
        let n = micro_losses.len() as f64;
        let mean = |f: fn(&StepReport) -> f64| micro_losses.iter().map(f).sum::<f64>() / n;
        let step_report = StepReport {
            loss: mean(|r| r.loss),
            loss_embeds: mean(|r| r.loss_embeds),
            loss_pooled: mean(|r| r.loss_pooled),
            ..report
        };
        micro_losses.clear();
        log(serde_json::json!({
            "step": step_report.step, "loss": step_report.loss, "loss_embeds": step_report.loss_embeds,
            "loss_pooled": step_report.loss_pooled, "grad_norm": step_report.grad_norm,
            "lr_lora": step_report.lr_lora, "lr_resampler": step_report.lr_resampler,
            "samples_per_s": samples_per_s, "elapsed_s": start.elapsed().as_secs_f64(),
        }))?;
        on_event(Event::Step {
            report: &step_report,
            samples_per_s,
            total_steps: opts.steps,
        });
        let step = trainer.step_count();
        let last = step >= opts.steps;
        if (opts.eval_every > 0 && step % opts.eval_every == 0) || last {
            last_eval = evaluate(
                &trainer,
                cache,
                &state.held_out,
                opts.eval_batch_size,
                &device,
            )?;
            log(serde_json::json!({"step": step, "eval": last_eval}))?;
            refresh_plot(&opts.out)?;
            on_event(Event::Eval {
                step,
                metrics: &last_eval,
            });
        }
        if (opts.save_every > 0 && step % opts.save_every == 0) || last {
            save(&trainer, &state, &opts.out)?;
            on_event(Event::Saved {
                step,
                path: &opts.out,
            });
        }
    }
    if interrupted {
        save(&trainer, &state, &opts.out)?;
        log(
            serde_json::json!({"step": trainer.step_count(), "event": "interrupted, checkpoint saved"}),
        )?;
        on_event(Event::Saved {
            step: trainer.step_count(),
            path: &opts.out,
        });
    }
    Ok(RunSummary {
        steps: trainer.step_count(),
        baseline_mean,
        first_eval,
        final_eval: last_eval,
        interrupted,
        adapter: opts.out.join(ADAPTER_DIR),
    })
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Checkpoint first, then the adapter: a crash between the two leaves a resumable run.
fn save(trainer: &Trainer, state: &LoopState, out: &Path) -> Result<()> {
    let extra = serde_json::to_value(state).expect("loop state serialises");
    trainer.save(&checkpoint_path(out), extra)?;
    trainer.save_adapter(&out.join(ADAPTER_DIR))?;
    refresh_plot(out)
}

fn next_batch(state: &mut LoopState, batch_size: usize) -> Vec<usize> {
    let mut batch = Vec::with_capacity(batch_size);
    while batch.len() < batch_size.min(state.order.len()) {
        if state.pos == state.order.len() {
            state.rng.shuffle(&mut state.order);
            state.pos = 0;
            state.epoch += 1;
        }
        batch.push(state.order[state.pos]);
        state.pos += 1;
    }
    batch
}

/// Held-out metrics over `indices` in batches.
pub fn evaluate(
    trainer: &Trainer,
    cache: &TargetCache,
    indices: &[usize],
    batch: usize,
    device: &Device,
) -> Result<EvalMetrics> {
    let mut total = EvalMetrics::default();
    for chunk in indices.chunks(batch.max(1)) {
        let prompts: Vec<&str> = chunk
            .iter()
            .map(|&i| cache.captions()[i].as_str())
            .collect();
        let (te, tp) = cache.get_batch(chunk, device)?;
        total = total.merge(&trainer.evaluate(&prompts, &te, &tp)?);
    }
    Ok(total)
}

/// The score of always predicting the training set's mean target: what a student must beat.
fn mean_baseline(
    cache: &TargetCache,
    train: &[usize],
    held: &[usize],
    device: &Device,
) -> Result<EvalMetrics> {
    if held.is_empty() {
        return Ok(EvalMetrics::default());
    }
    let mut sum: Option<(Tensor, Tensor)> = None;
    for chunk in train.chunks(64) {
        let (e, p) = cache.get_batch(chunk, device)?;
        let part = (
            e.to_dtype(DType::F64)?.sum_keepdim(0)?,
            p.to_dtype(DType::F64)?.sum_keepdim(0)?,
        );
        sum = Some(match sum {
            None => part,
            Some((a, b)) => ((a + part.0)?, (b + part.1)?),
        });
    }
    let (se, sp) = sum.expect("train set is not empty");
    let n = train.len() as f64;
    let (me, mp) = (
        (se / n)?.to_dtype(DType::F32)?,
        (sp / n)?.to_dtype(DType::F32)?,
    );
    let mut total = EvalMetrics::default();
    for chunk in held.chunks(64) {
        let (te, tp) = cache.get_batch(chunk, device)?;
        let k = chunk.len();
        let pred = (
            me.broadcast_as(te.shape())?.contiguous()?,
            mp.broadcast_as((k, mp.dim(1)?))?.contiguous()?,
        );
        total = total.merge(&EvalMetrics::of((&pred.0, &pred.1), (&te, &tp))?);
    }
    Ok(total)
}

/// Drops metric lines past `step` so a resumed run does not repeat them.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .collect();
    crate::formats::safetensors::write_atomic(path, (kept.join("\n") + "\n").as_bytes())
}

/// Redraws `loss.png` from `metrics.jsonl`: training loss (blue), held-out MSE (red).
pub fn refresh_plot(out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap_or_default();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(e) = v.get("eval") {
            let m = |k: &str| e.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
            eval.push((step, m("mse_embeds") + m("mse_pooled")));
        }
    }
    write_loss_png(
        &out.join(LOSS_PNG),
        &[
            Series {
                points: &train,
                rgb: [30, 90, 200],
            },
            Series {
                points: &eval,
                rgb: [210, 40, 40],
            },
        ],
    )
}
