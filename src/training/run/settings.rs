//! Which settings a run accepts, and what a resumed run does with settings that differ from
//! its checkpoint's: the adapter's shape cannot change (refused, naming each setting); the
//! held-out split and data order belong to the run (kept, with a note); everything else
//! (steps, learning rates, schedule, accumulation, saving, ...) takes the new value, with a
//! note. A larger `steps` extends a finished run, and the schedule is re-planned over it.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::training::TrainConfig;

/// Settings that fix the adapter's shape when a run starts.
const SHAPE: [&str; 8] = [
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "use_rslora",
    "resampler_width",
    "resampler_heads",
    "resampler_ff_mult",
    "resampler_layers",
];
/// 0 asks for the derived value: on a resumed run, whatever the run has.
const AUTO_WHEN_ZERO: [&str; 2] = ["resampler_width", "resampler_heads"];
/// Far above any useful LoRA rank (ComfyUI's widget stops at 1024); the bound keeps a typo
/// from asking for terabytes of LoRA weights.
const MAX_LORA_R: usize = 1 << 12;
/// Settings the run's data order was made from.
const DATA_ORDER: [&str; 2] = ["seed", "held_out"];

/// Refuses values no run can train with, naming the setting.
pub fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |what: &str, v: String, want: &str| {
        Err(Error::Invalid(format!(
            "training setting `{what}` is {v}; it must be {want}"
        )))
    };
    for (name, v) in [
        ("steps", cfg.steps as usize),
        ("batch_size", cfg.batch_size),
        ("grad_accum", cfg.grad_accum),
        ("eval_batch_size", cfg.eval_batch_size),
        ("lora_r", cfg.lora_r),
        ("resampler_ff_mult", cfg.resampler_ff_mult),
        ("resampler_layers", cfg.resampler_layers),
    ] {
        if v == 0 {
            return bad(name, "0".into(), "at least 1");
        }
    }
    if cfg.lora_r > MAX_LORA_R {
        return bad(
            "lora_r",
            cfg.lora_r.to_string(),
            &format!("at most {MAX_LORA_R}"),
        );
    }
    for (name, v) in [
        ("lr_lora", cfg.lr_lora),
        ("lr_resampler", cfg.lr_resampler),
        ("max_grad_norm", cfg.max_grad_norm),
        ("loss_weight_embeds", cfg.loss_weight_embeds),
        ("loss_weight_pooled", cfg.loss_weight_pooled),
        ("adamw.weight_decay", cfg.adamw.weight_decay),
        ("lora_alpha", cfg.lora_alpha),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(name, v.to_string(), "a finite number >= 0");
        }
    }
    if !(cfg.held_out.is_finite() && (0.0..1.0).contains(&cfg.held_out)) {
        return bad("held_out", cfg.held_out.to_string(), "a fraction in [0, 1)");
    }
    for (name, v) in [
        ("adamw.beta1", cfg.adamw.beta1),
        ("adamw.beta2", cfg.adamw.beta2),
    ] {
        if !(v.is_finite() && (0.0..1.0).contains(&v)) {
            return bad(name, v.to_string(), "in [0, 1)");
        }
    }
    if !(cfg.adamw.eps.is_finite() && cfg.adamw.eps > 0.0) {
        return bad(
            "adamw.eps",
            cfg.adamw.eps.to_string(),
            "a finite number > 0",
        );
    }
    if cfg.lora_targets.is_empty() {
        return bad("lora_targets", "empty".into(), "at least one projection");
    }
    cfg.vision.validate().map_err(Error::Invalid)
}

/// The settings a run resumed from `ckpt` at optimizer step `step` continues with, and notes
/// on what differed from `saved` (the checkpoint's) and what was done about it.
pub fn reconcile(
    saved: &TrainConfig,
    asked: &Value,
    step: u64,
    ckpt: &Path,
) -> Result<(TrainConfig, Vec<String>)> {
    let merged = TrainConfig::overlay(saved, asked)?;
    validate(&merged)?;
    let (old, new) = (to_map(saved), to_map(&merged));
    let mut kept = old.clone();
    let mut notes = Vec::new();
    let mut refused = Vec::new();
    for key in old.keys() {
        let (a, b) = (&old[key], &new[key]);
        if a == b {
            continue;
        }
        let k = key.as_str();
        if AUTO_WHEN_ZERO.contains(&k) && b == &Value::from(0) {
            continue;
        }
        if SHAPE.contains(&k) {
            refused.push(format!("{k} = {b} (the run has {a})"));
        } else if DATA_ORDER.contains(&k) {
            notes.push(format!(
                "kept {k} = {a} (asked {b}): the held-out split and the data order were made from it when the run started"
            ));
        } else if k == "steps" {
            kept.insert(key.clone(), b.clone());
            notes.push(steps_note(a, b, step));
        } else {
            kept.insert(key.clone(), b.clone());
            notes.push(format!("{k}: {a} -> {b}"));
        }
    }
    if !refused.is_empty() {
        return Err(Error::Invalid(format!(
            "{} cannot continue with {}: an adapter's shape is fixed when its run starts; use the run's values (or leave them unset), or train into another folder",
            ckpt.display(),
            refused.join(", ")
        )));
    }
    let cfg = serde_json::from_value(Value::Object(kept)).expect("settings round-trip");
    Ok((cfg, notes))
}

fn steps_note(old: &Value, new: &Value, step: u64) -> String {
    let new_steps = new.as_u64().unwrap_or(0);
    if new_steps <= step {
        format!(
            "steps {old} -> {new}: the run is already at step {step}, so there is nothing to train; raise steps to continue it"
        )
    } else {
        format!(
            "steps {old} -> {new}: the run continues to step {new}; the learning-rate schedule is re-planned over {new} steps"
        )
    }
}

fn to_map(cfg: &TrainConfig) -> serde_json::Map<String, Value> {
    match serde_json::to_value(cfg).expect("settings serialise") {
        Value::Object(m) => m,
        _ => unreachable!("a struct serialises to an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank of 2^31 would be refused by nothing else before its terabytes are allocated
    /// (and an allocation failure aborts the host).
    #[test]
    fn a_lora_rank_beyond_any_use_is_refused_by_name() {
        let with = |lora_r| TrainConfig {
            lora_r,
            ..Default::default()
        };
        validate(&with(MAX_LORA_R)).unwrap();
        for r in [0, MAX_LORA_R + 1, 1 << 31] {
            let err = validate(&with(r)).unwrap_err().to_string();
            assert!(
                err.contains("`lora_r`") && err.contains(&r.to_string()),
                "{err}"
            );
        }
    }
}
