//! Every setting of a training run and its default, in one place: the CLI, the C ABI and the
//! ComfyUI node all start from [`TrainConfig::default`] (the node reads it through the
//! library) and override only what their user set.

use serde::{Deserialize, Serialize};

use super::optim::AdamWConfig;
use super::schedule::Schedule;
use super::vision::{Objective, VisionConfig};
pub use crate::data::TargetDims;
use crate::error::{Error, Result};
use crate::resampler::ResamplerConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps in total; the learning-rate schedule spans them (cosine reaches 0 there).
    #[serde(alias = "total_steps")]
    pub steps: u64,
    /// Captions per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Fraction of the captions held out for evaluation (0: none).
    pub held_out: f64,
    /// Evaluate every N optimizer steps (0: only at the start and the end).
    pub eval_every: u64,
    pub eval_batch_size: usize,
    /// Checkpoint and adapter every N optimizer steps (0: only at the end and on a stop).
    pub save_every: u64,
    /// Initial weights, the held-out split and the data order.
    pub seed: u64,

    pub lr_lora: f64,
    /// Higher than the LoRA's: the resampler starts from scratch.
    pub lr_resampler: f64,
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    pub loss_weight_embeds: f64,
    pub loss_weight_pooled: f64,
    /// `mse` (the teacher's outputs), `vision` (what the judge UNet predicts with them) or
    /// `mixed`.
    pub objective: Objective,
    pub vision: VisionConfig,

    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub use_rslora: bool,
    /// 0: derived from the base model's width (see [`TrainConfig::resampler_for`]).
    pub resampler_width: usize,
    /// 0: derived from the resampler's width.
    pub resampler_heads: usize,
    pub resampler_ff_mult: usize,
    pub resampler_layers: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let r = ResamplerConfig::for_input(0);
        Self {
            steps: 1000,
            batch_size: 4,
            grad_accum: 1,
            held_out: 0.05,
            eval_every: 100,
            eval_batch_size: 8,
            save_every: 100,
            seed: 0,
            lr_lora: 1e-4,
            lr_resampler: 5e-4,
            adamw: AdamWConfig::default(),
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            loss_weight_embeds: 1.0,
            loss_weight_pooled: 1.0,
            objective: Objective::Mse,
            vision: VisionConfig::default(),
            lora_r: 16,
            lora_alpha: 16.0,
            lora_targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            resampler_width: 0,
            resampler_heads: 0,
            resampler_ff_mult: r.ff_mult,
            resampler_layers: r.layers,
        }
    }
}

/// The widest resampler a default run builds: the reference system's (Qwen3-4B, ~278M
/// parameters). Narrower bases get their own width, so a tiny base gets a tiny resampler.
const MAX_AUTO_WIDTH: usize = 2048;
/// Head width the derived head count aims for; at most this many heads.
const AUTO_HEAD_DIM: usize = 64;
const MAX_AUTO_HEADS: usize = 16;

impl TrainConfig {
    /// `partial` (a JSON object of some fields) over `base`; an unknown field or a value of the
    /// wrong type is an error naming it.
    pub fn overlay(base: &TrainConfig, partial: &serde_json::Value) -> Result<TrainConfig> {
        let Some(fields) = partial.as_object() else {
            return Err(Error::Invalid(format!(
                "training settings must be a JSON object, got {partial}"
            )));
        };
        let mut merged = serde_json::to_value(base).expect("config serialises");
        for (k, v) in fields {
            let k = if k == "total_steps" { "steps" } else { k };
            merge(&mut merged[k], v);
        }
        serde_json::from_value(merged)
            .map_err(|e| Error::Invalid(format!("training settings: {e}")))
    }

    /// The resampler this config builds on a base of width `input_dim` for targets `dims`:
    /// width 0 means min(base width, 2048) rounded down to a multiple of 64 (at least 64),
    /// heads 0 means width / 64, at most 16.
    pub fn resampler_for(&self, input_dim: usize, dims: TargetDims) -> ResamplerConfig {
        let width = match self.resampler_width {
            0 => (input_dim.min(MAX_AUTO_WIDTH) / 64 * 64).max(64),
            w => w,
        };
        let heads = match self.resampler_heads {
            0 => (width / AUTO_HEAD_DIM).clamp(1, MAX_AUTO_HEADS),
            h => h,
        };
        ResamplerConfig {
            width,
            heads,
            ff_mult: self.resampler_ff_mult,
            layers: self.resampler_layers,
            num_latents: dims.seq,
            output_dim: dims.embed,
            pooled_dim: dims.pooled,
            ..ResamplerConfig::for_input(input_dim)
        }
    }
}

/// `over` into `into`; objects merge field by field (`{"adamw": {"weight_decay": 0}}` keeps
/// the other AdamW settings).
fn merge(into: &mut serde_json::Value, over: &serde_json::Value) {
    match (into, over) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}
