//! A diffusers `scheduler/scheduler_config.json`, and what each scheduler makes of it.
//!
//! Fields keep the value written in the file (`None` when absent or `null`): diffusers gives a
//! missing field the default of the class that reads it, and `EulerDiscreteScheduler` and
//! `DDIMScheduler` disagree (`timestep_spacing`: linspace vs leading; `clip_sample` exists
//! only for DDIM). Fields a class does not know are ignored by it, as diffusers does. A
//! setting that would change the result but is not implemented is refused, naming the field.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::prediction::PredictionType;
use super::schedule::{BetaSchedule, NoiseSchedule};
use super::timesteps::TimestepSpacing;
use crate::error::{Error, Result};

/// SDXL base 1.0's `scheduler/scheduler_config.json`, verbatim.
pub const SDXL_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}"#;

/// The fields of a diffusers scheduler config that qwenclip reads (others are ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>")]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    /// Only `null` is supported.
    pub trained_betas: Option<Value>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    /// DDIM: the `alphas_cumprod` after the last step, 1 or `alphas_cumprod[0]`.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clamp `x0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: only `linear`.
    pub interpolation_type: Option<String>,
    /// Euler: only false (also `use_exponential_sigmas`, `use_beta_sigmas`).
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// Euler: only `discrete`.
    pub timestep_type: Option<String>,
    /// Euler: only `zero`.
    pub final_sigmas_type: Option<String>,
}

/// The scheduler classes whose defaults and fields apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Euler,
    Ddim,
}

/// A config with the class defaults applied and every unsupported setting refused.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub schedule: NoiseSchedule,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// DDIM only.
    pub set_alpha_to_one: bool,
    /// DDIM only: the clamp range when `clip_sample` is on.
    pub clip_sample: Option<f32>,
}

impl SchedulerConfig {
    /// SDXL base 1.0's config ([`SDXL_SCHEDULER_CONFIG`]).
    pub fn sdxl() -> Self {
        Self::from_json(SDXL_SCHEDULER_CONFIG).expect("SDXL's scheduler config parses")
    }

    /// Reads `scheduler_config.json` (a diffusers `scheduler/` folder's file).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Invalid(msg) => Error::format(path, msg),
            e => e,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("scheduler config: {e}")))
    }

    /// Applies `class`'s defaults and refuses what qwenclip does not implement.
    pub(crate) fn resolve(&self, class: Class) -> Result<Resolved> {
        let euler = class == Class::Euler;
        if let Some(v) = self.trained_betas.as_ref().filter(|v| !v.is_null()) {
            let kind = if v.is_array() { "a list" } else { "a value" };
            return Err(refuse("trained_betas", &format!("{kind} (only null)")));
        }
        let schedule_name = self.beta_schedule.as_deref().unwrap_or("linear");
        let beta_schedule = BetaSchedule::parse(schedule_name).ok_or_else(|| {
            refuse(
                "beta_schedule",
                &format!("\"{schedule_name}\" (linear or scaled_linear)"),
            )
        })?;
        let prediction_name = self.prediction_type.as_deref().unwrap_or("epsilon");
        let prediction = PredictionType::parse(prediction_name).ok_or_else(|| {
            refuse(
                "prediction_type",
                &format!("\"{prediction_name}\" (epsilon or v_prediction)"),
            )
        })?;
        let spacing_name =
            self.timestep_spacing
                .as_deref()
                .unwrap_or(if euler { "linspace" } else { "leading" });
        let spacing = TimestepSpacing::parse(spacing_name).ok_or_else(|| {
            refuse(
                "timestep_spacing",
                &format!("\"{spacing_name}\" (leading, trailing or linspace)"),
            )
        })?;
        if self.rescale_betas_zero_snr == Some(true) {
            return Err(refuse("rescale_betas_zero_snr", "true (only false)"));
        }
        let mut clip_sample = None;
        if euler {
            let text =
                |field: &'static str, value: &Option<String>, only: &str| match value.as_deref() {
                    Some(v) if v != only => Err(refuse(field, &format!("\"{v}\" (only {only})"))),
                    _ => Ok(()),
                };
            text("interpolation_type", &self.interpolation_type, "linear")?;
            text("timestep_type", &self.timestep_type, "discrete")?;
            text("final_sigmas_type", &self.final_sigmas_type, "zero")?;
            for (field, on) in [
                ("use_karras_sigmas", self.use_karras_sigmas),
                ("use_exponential_sigmas", self.use_exponential_sigmas),
                ("use_beta_sigmas", self.use_beta_sigmas),
            ] {
                if on == Some(true) {
                    return Err(refuse(field, "true (only false)"));
                }
            }
        } else {
            if self.thresholding == Some(true) {
                return Err(refuse("thresholding", "true (only false)"));
            }
            if self.clip_sample.unwrap_or(true) {
                let range = self.clip_sample_range.unwrap_or(1.0);
                if !(range.is_finite() && range > 0.0) {
                    return Err(refuse(
                        "clip_sample_range",
                        &format!("{range} (must be > 0)"),
                    ));
                }
                clip_sample = Some(range as f32);
            }
        }
        let schedule = NoiseSchedule::new(
            self.num_train_timesteps.unwrap_or(1000),
            self.beta_start.unwrap_or(0.0001),
            self.beta_end.unwrap_or(0.02),
            beta_schedule,
        )
        .map_err(|e| Error::Invalid(format!("scheduler config: {e}")))?;
        Ok(Resolved {
            schedule,
            prediction,
            spacing,
            steps_offset: self.steps_offset.unwrap_or(0),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            clip_sample,
        })
    }
}

fn refuse(field: &str, what: &str) -> Error {
    Error::Invalid(format!(
        "scheduler config: field `{field}` = {what} is not supported"
    ))
}

/// Field-by-field parsing, so that a value of the wrong type names its field.
impl TryFrom<Map<String, Value>> for SchedulerConfig {
    type Error = String;

    fn try_from(map: Map<String, Value>) -> std::result::Result<Self, String> {
        let get = |field: &str| map.get(field).filter(|v| !v.is_null());
        let wrong =
            |field: &str, want: &str| format!("field `{field}` must be {want}, got {}", map[field]);
        let string = |field: &str| -> std::result::Result<Option<String>, String> {
            get(field)
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| wrong(field, "a string"))
                })
                .transpose()
        };
        let boolean = |field: &str| -> std::result::Result<Option<bool>, String> {
            get(field)
                .map(|v| v.as_bool().ok_or_else(|| wrong(field, "true or false")))
                .transpose()
        };
        let float = |field: &str| -> std::result::Result<Option<f64>, String> {
            get(field)
                .map(|v| v.as_f64().ok_or_else(|| wrong(field, "a number")))
                .transpose()
        };
        let count = |field: &str| -> std::result::Result<Option<usize>, String> {
            get(field)
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| wrong(field, "a non-negative integer"))
                })
                .transpose()
        };
        Ok(Self {
            class_name: string("_class_name")?,
            num_train_timesteps: count("num_train_timesteps")?,
            beta_start: float("beta_start")?,
            beta_end: float("beta_end")?,
            beta_schedule: string("beta_schedule")?,
            trained_betas: get("trained_betas").cloned(),
            prediction_type: string("prediction_type")?,
            timestep_spacing: string("timestep_spacing")?,
            steps_offset: count("steps_offset")?,
            set_alpha_to_one: boolean("set_alpha_to_one")?,
            clip_sample: boolean("clip_sample")?,
            clip_sample_range: float("clip_sample_range")?,
            thresholding: boolean("thresholding")?,
            rescale_betas_zero_snr: boolean("rescale_betas_zero_snr")?,
            interpolation_type: string("interpolation_type")?,
            use_karras_sigmas: boolean("use_karras_sigmas")?,
            use_exponential_sigmas: boolean("use_exponential_sigmas")?,
            use_beta_sigmas: boolean("use_beta_sigmas")?,
            timestep_type: string("timestep_type")?,
            final_sigmas_type: string("final_sigmas_type")?,
        })
    }
}
