//! Trainer exports: one micro-batch step at a time, checkpoints, adapter export.

use std::ffi::c_char;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use once_cell::sync::Lazy;
use serde::Deserialize;

use super::boundary::{self, call, invalid, qwenclip_status, FfiResult};
use super::encoder::ENCODERS;
use super::registry::Registry;
use crate::training::{TargetDims, TrainConfig, Trainer};
use crate::LoraMode;

/// What one `qwenclip_trainer_step` did.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct qwenclip_step_report {
    /// Weighted total loss of this micro-batch.
    pub loss: f64,
    pub loss_embeds: f64,
    pub loss_pooled: f64,
    /// Global gradient norm before clipping; NaN when the optimizer did not step.
    pub grad_norm: f64,
    /// 1 when this call completed a gradient-accumulation cycle and updated the weights.
    pub optimizer_stepped: u8,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub lr_lora: f64,
    pub lr_resampler: f64,
}

/// The JSON accepted by `qwenclip_trainer_new`: every `TrainConfig` field (all optional) plus
/// `dims` (`{"seq":77,"embed":2048,"pooled":1280}` by default).
#[derive(Deserialize)]
struct TrainerSpec {
    #[serde(default = "sdxl")]
    dims: TargetDims,
    #[serde(flatten)]
    config: TrainConfig,
}

fn sdxl() -> TargetDims {
    TargetDims::SDXL
}

fn parse_spec(text: &str) -> FfiResult<TrainerSpec> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("trainer config JSON: {e}")))?;
    let known = serde_json::to_value(TrainConfig::default()).expect("config serialises");
    if let Some(obj) = value.as_object() {
        if let Some(k) = obj
            .keys()
            .find(|k| *k != "dims" && known.get(k.as_str()).is_none())
        {
            return Err(invalid(format!("trainer config JSON: unknown field `{k}`")));
        }
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("trainer config JSON: {e}")))
}

pub static TRAINERS: Lazy<Registry<Mutex<Trainer>>> =
    Lazy::new(|| Registry::new("trainer", 0x7A1E));

fn lock(t: &Mutex<Trainer>) -> std::sync::MutexGuard<'_, Trainer> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn held_bytes() -> Vec<(usize, bool)> {
    TRAINERS
        .all()
        .iter()
        .map(|t| {
            let t = lock(t);
            (
                t.encoder().weight_bytes() + t.state_bytes(),
                t.encoder().llm().device().is_cuda(),
            )
        })
        .collect()
}

fn new_trainer(
    encoder: u64,
    make: impl FnOnce(crate::Encoder) -> FfiResult<Trainer>,
) -> FfiResult<u64> {
    let mut enc = ENCODERS.get(encoder)?.with(|e| Ok(e.clone()))?;
    enc.set_lora_mode(LoraMode::Unmerged);
    let trainer = make(enc)?;
    Ok(TRAINERS.insert(Mutex::new(trainer)))
}

/// Creates a trainer for the encoder's base model (and its adapter, if it has one: training
/// continues from it). The encoder itself is not changed; it shares the frozen weights.
/// `config_json`: optional TrainConfig fields and `dims` (see README); NULL = defaults.
#[no_mangle]
pub extern "C" fn qwenclip_trainer_new(
    encoder: u64,
    config_json: *const c_char,
    out_handle: *mut u64,
) -> qwenclip_status {
    call(|| {
        let spec = match boundary::opt_str_arg(config_json, "config_json")? {
            Some(t) => parse_spec(t)?,
            None => parse_spec("{}")?,
        };
        let out = boundary::out_ptr(out_handle, "out_handle")?;
        *out = new_trainer(encoder, |e| Ok(Trainer::new(e, spec.config, spec.dims)?))?;
        Ok(())
    })
}

/// Recreates a trainer from a checkpoint written by `qwenclip_trainer_save`, on the
/// encoder's base model; training continues exactly where it was saved.
#[no_mangle]
pub extern "C" fn qwenclip_trainer_load(
    encoder: u64,
    checkpoint_path: *const c_char,
    out_handle: *mut u64,
) -> qwenclip_status {
    call(|| {
        let path = boundary::str_arg(checkpoint_path, "checkpoint_path")?;
        let out = boundary::out_ptr(out_handle, "out_handle")?;
        *out = new_trainer(encoder, |mut e| {
            e.set_adapter(None)?;
            Ok(Trainer::resume(e, Path::new(path))?.0)
        })?;
        Ok(())
    })
}

/// One micro-batch: `n_prompts` prompts with the teacher's outputs for them, `embeds`
/// `[n, seq, embed]` and `pooled` `[n, pooled]` f32 (sizes in floats, checked). Every
/// `grad_accum` calls the optimizer steps. On `QWENCLIP_NON_FINITE` nothing was changed.
#[no_mangle]
pub extern "C" fn qwenclip_trainer_step(
    handle: u64,
    prompts: *const *const c_char,
    n_prompts: usize,
    embeds: *const f32,
    embeds_len: usize,
    pooled: *const f32,
    pooled_len: usize,
    out_report: *mut qwenclip_step_report,
) -> qwenclip_status {
    call(|| {
        let prompts = boundary::prompts_arg(prompts, n_prompts)?;
        let out = boundary::out_ptr(out_report, "out_report")?;
        let t = TRAINERS.get(handle)?;
        let mut t = lock(&t);
        let d = t.dims();
        let n = prompts.len();
        let e = boundary::buffer(embeds, embeds_len, n * d.seq * d.embed, "embeds")?;
        let p = boundary::buffer(pooled, pooled_len, n * d.pooled, "pooled")?;
        let e = Tensor::from_slice(e, (n, d.seq, d.embed), &Device::Cpu)?;
        let p = Tensor::from_slice(p, (n, d.pooled), &Device::Cpu)?;
        let r = t.step(&prompts, &e, &p)?;
        *out = qwenclip_step_report {
            loss: r.loss,
            loss_embeds: r.loss_embeds,
            loss_pooled: r.loss_pooled,
            grad_norm: r.grad_norm.unwrap_or(f64::NAN),
            optimizer_stepped: u8::from(r.optimizer_stepped),
            step: r.step,
            lr_lora: r.lr_lora,
            lr_resampler: r.lr_resampler,
        };
        Ok(())
    })
}

/// Writes a checkpoint (weights, optimizer state, counters) to `path`, atomically: a failed
/// write leaves any previous file at `path` intact.
#[no_mangle]
pub extern "C" fn qwenclip_trainer_save(handle: u64, path: *const c_char) -> qwenclip_status {
    call(|| {
        let path = boundary::str_arg(path, "path")?;
        let t = TRAINERS.get(handle)?;
        let r = lock(&t).save(Path::new(path), serde_json::Value::Null);
        Ok(r?)
    })
}

/// Writes the current LoRA + resampler as an adapter bundle into folder `dir`.
#[no_mangle]
pub extern "C" fn qwenclip_trainer_save_adapter(
    handle: u64,
    dir: *const c_char,
) -> qwenclip_status {
    call(|| {
        let dir = boundary::str_arg(dir, "dir")?;
        let t = TRAINERS.get(handle)?;
        let r = lock(&t).save_adapter(Path::new(dir));
        Ok(r?)
    })
}

/// Frees a trainer (its state is lost unless saved).
#[no_mangle]
pub extern "C" fn qwenclip_trainer_free(handle: u64) -> qwenclip_status {
    call(|| TRAINERS.remove(handle).map(drop))
}
