//! Vision-based distillation ("Scaling Down Text Encoders of Text-to-Image Diffusion
//! Models"): the student is judged by what the frozen SDXL UNet predicts with its
//! conditioning, along the teacher's own sampling trajectory, starting from pure noise, so no
//! images are needed. Per denoising step of a trajectory: the teacher's prediction (no
//! gradient) and the student's on the same latents, timestep and size ids; loss = the
//! per-sample mean squared difference, averaged over the batch; the latents advance with the
//! teacher's classifier-free-guided prediction (the empty prompt's teacher conditioning as the
//! unconditional branch, guidance drawn per trajectory).
//!
//! [`Judge`] is the frozen UNet with its noise schedule; [`Trajectory`] is one batch's walk
//! (saved in checkpoints: a resumed run replays the teacher's steps to the same latents);
//! [`collapse`] measures whether different prompts get different conditionings.

pub mod collapse;
mod trajectory;

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

pub use trajectory::Trajectory;

use crate::error::{Error, Result};
use crate::ops::ForwardMode;
use crate::sampling::{guide, Batch, Ddim, Euler, PredictionType, Sampler, SchedulerConfig, Step};
use crate::unet::{UNet, UNetConditioning, UNetConfig};

/// What the student learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// The teacher's outputs (output matching).
    #[default]
    Mse,
    /// What the frozen UNet predicts with the conditioning.
    Vision,
    /// `lambda_vision * vision + lambda_mse * mse`.
    Mixed,
}

impl Objective {
    pub fn needs_judge(self) -> bool {
        self != Objective::Mse
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" => Ok(Self::Mse),
            "vision" => Ok(Self::Vision),
            "mixed" => Ok(Self::Mixed),
            o => Err(format!("unknown objective \"{o}\" (mse, vision, mixed)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// SDXL's default scheduler (`EulerDiscreteScheduler`).
    #[default]
    Euler,
    /// `DDIMScheduler`, eta = 0.
    Ddim,
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "euler" => Ok(Self::Euler),
            "ddim" => Ok(Self::Ddim),
            o => Err(format!("unknown sampler \"{o}\" (euler, ddim)")),
        }
    }
}

/// The vision objective's settings (a part of `TrainConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionConfig {
    /// Image side in pixels (latents are 1/8 of it); 512 as the paper's reference loop.
    pub resolution: usize,
    /// Denoising steps per trajectory (one training step each).
    pub denoise_steps: usize,
    /// Guidance is drawn per trajectory from `min, min + step, ..., max`.
    pub guidance_min: f64,
    pub guidance_max: f64,
    pub guidance_step: f64,
    pub sampler: SamplerKind,
    pub lambda_vision: f64,
    /// The output-matching weight of the `mixed` objective.
    pub lambda_mse: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            resolution: 512,
            denoise_steps: 20,
            guidance_min: 2.0,
            guidance_max: 5.0,
            guidance_step: 0.5,
            sampler: SamplerKind::Euler,
            lambda_vision: 1.0,
            lambda_mse: 1.0,
        }
    }
}

impl VisionConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return Err(format!(
                "vision.resolution is {}; it must be a positive multiple of 8",
                self.resolution
            ));
        }
        if self.denoise_steps == 0 {
            return Err("vision.denoise_steps must be at least 1".into());
        }
        let g = [self.guidance_min, self.guidance_max, self.guidance_step];
        if g.iter().any(|v| !v.is_finite() || *v < 0.0)
            || self.guidance_min > self.guidance_max
            || self.guidance_step <= 0.0
        {
            return Err(format!(
                "vision guidance range {}..{} step {} must be finite, >= 0, min <= max, step > 0",
                self.guidance_min, self.guidance_max, self.guidance_step
            ));
        }
        for (name, v) in [
            ("vision.lambda_vision", self.lambda_vision),
            ("vision.lambda_mse", self.lambda_mse),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} is {v}; it must be a finite number >= 0"));
            }
        }
        Ok(())
    }

    /// The guidance scales a trajectory may draw from.
    pub fn guidance_grid(&self) -> Vec<f64> {
        let n = ((self.guidance_max - self.guidance_min) / self.guidance_step + 1e-9).floor();
        (0..=n as usize)
            .map(|i| self.guidance_min + i as f64 * self.guidance_step)
            .collect()
    }
}

/// Who judges the student under the vision objective.
#[derive(Default)]
pub enum Judging {
    /// Nobody: output matching only.
    #[default]
    None,
    /// The library's own UNet.
    Unet(Box<Judge>),
    /// The host (the ComfyUI node with the artist's own patched UNet): the run plans each
    /// trajectory (captions, noise, guidance) and hands out the student's conditioning; the
    /// host walks the trajectory with its UNet and returns the loss and its gradient with
    /// respect to that conditioning ([`injected_loss`]).
    Host,
}

impl Judging {
    pub fn is_some(&self) -> bool {
        !matches!(self, Judging::None)
    }
}

/// A loss whose value is `value` and whose gradient with respect to the conditioning
/// (`embeds`, `pooled`, tracked) is (`grad_embeds`, `grad_pooled`): what a host that computed
/// both outside the library hands back. `<x, g> - <detach(x), g>` is exactly zero (the same
/// sums of the same numbers) with gradient `g`.
pub fn injected_loss(
    (embeds, pooled): (&Tensor, &Tensor),
    (grad_embeds, grad_pooled): (&Tensor, &Tensor),
    value: f64,
) -> Result<Tensor> {
    let inner = |x: &Tensor, g: &Tensor| -> Result<Tensor> {
        let tracked = (x * g)?.sum_all()?;
        let constant = (x.detach() * g)?.sum_all()?;
        Ok((tracked - constant)?)
    };
    let zero = (inner(embeds, grad_embeds)? + inner(pooled, grad_pooled)?)?;
    Ok((zero + value)?)
}

/// The frozen judge: an SDXL UNet and the noise schedule it was trained with.
pub struct Judge {
    pub unet: UNet,
    pub scheduler: SchedulerConfig,
}

/// The tensor a single-file checkpoint carries when it is a v-prediction model (the
/// convention of ComfyUI and the SGM trainers).
const V_PRED_KEY: &str = "v_pred";

impl Judge {
    /// The UNet at `path` (a diffusers pipeline or `unet/` folder, or a single-file SDXL
    /// checkpoint, read with `config` when its shapes are not SDXL's) and its schedule: a
    /// pipeline's `scheduler/scheduler_config.json`, else SDXL's, with the prediction type a
    /// single file's keys declare. `prediction` overrides it, but a single file that declares
    /// v-prediction is never judged as epsilon.
    pub fn load(
        path: &Path,
        config: Option<&UNetConfig>,
        prediction: Option<PredictionType>,
        dtype: DType,
        device: &Device,
    ) -> Result<Judge> {
        let mut scheduler = [path.join("scheduler"), path.join("../scheduler")]
            .iter()
            .map(|d| d.join("scheduler_config.json"))
            .find(|f| path.is_dir() && f.is_file())
            .map(|f| SchedulerConfig::load(&f))
            .transpose()?
            .unwrap_or_else(SchedulerConfig::sdxl);
        if path.is_file() {
            let declares_v = crate::formats::safetensors::read_tensor_names(path)?
                .iter()
                .any(|n| n == V_PRED_KEY);
            if declares_v && prediction == Some(PredictionType::Epsilon) {
                return Err(Error::format(
                    path,
                    format!("its `{V_PRED_KEY}` key says it is a v-prediction model, but epsilon prediction was asked for; leave the prediction type unset or ask for v_prediction"),
                ));
            }
            if declares_v {
                scheduler.prediction_type = Some("v_prediction".into());
            }
        }
        if let Some(p) = prediction {
            scheduler.prediction_type = Some(p.name().into());
        }
        let unet = match config {
            Some(cfg) => UNet::load_with_config(path, cfg, dtype, device)?,
            None => UNet::load(path, dtype, device)?,
        };
        Ok(Judge { unet, scheduler })
    }

    pub fn sampler(&self, kind: SamplerKind, steps: usize) -> Result<Box<dyn Sampler>> {
        Ok(match kind {
            SamplerKind::Euler => Box::new(Euler::new(&self.scheduler, steps)?),
            SamplerKind::Ddim => Box::new(Ddim::new(&self.scheduler, steps)?),
        })
    }

    /// Latent channels and the side of the latents for `resolution` pixels.
    pub fn latent_shape(&self, batch: usize, resolution: usize) -> (usize, usize, usize, usize) {
        let side = resolution / 8;
        (batch, self.unet.config().in_channels, side, side)
    }

    /// SDXL's six size ids for a square image without crop, `[batch, 6]`.
    pub fn time_ids(&self, batch: usize, resolution: usize) -> Result<Tensor> {
        let r = resolution as f32;
        let row = [r, r, 0.0, 0.0, r, r];
        Ok(Tensor::from_vec(
            row.repeat(batch),
            (batch, 6),
            self.unet.device(),
        )?)
    }

    /// The UNet's prediction for `latents` at denoising `step` with conditioning
    /// (`embeds`, `pooled`).
    pub fn predict(
        &self,
        sampler: &dyn Sampler,
        step: usize,
        latents: &Tensor,
        time_ids: &Tensor,
        (embeds, pooled): (&Tensor, &Tensor),
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let at = Step::All(step);
        let input = sampler.scale_model_input(latents, &at)?;
        let t = sampler.timestep_input(&at, latents.dim(0)?, latents.device())?;
        let cond = UNetConditioning {
            encoder_hidden_states: embeds,
            text_embeds: pooled,
            time_ids,
        };
        Ok(self
            .unet
            .forward(&input, &t, &cond, mode)?
            .to_dtype(DType::F32)?)
    }

    /// The teacher's side of a denoising step: its conditional prediction (what the student
    /// must match) and the latents one step later, advanced with the guided prediction.
    #[allow(clippy::too_many_arguments)]
    pub fn teacher_step(
        &self,
        sampler: &dyn Sampler,
        step: usize,
        latents: &Tensor,
        time_ids: &Tensor,
        teacher: (&Tensor, &Tensor),
        uncond: (&Tensor, &Tensor),
        guidance: &[f64],
    ) -> Result<(Tensor, Tensor)> {
        let n = latents.dim(0)?;
        let cond = self
            .predict(sampler, step, latents, time_ids, teacher, ForwardMode::Fast)?
            .detach();
        let ue = uncond
            .0
            .broadcast_as((n, uncond.0.dim(1)?, uncond.0.dim(2)?))?;
        let up = uncond.1.broadcast_as((n, uncond.1.dim(1)?))?;
        let free = self
            .predict(
                sampler,
                step,
                latents,
                time_ids,
                (&ue.contiguous()?, &up.contiguous()?),
                ForwardMode::Fast,
            )?
            .detach();
        let guided = guide(&free, &cond, &Batch::Each(guidance.to_vec()))?;
        let next = sampler.step(&guided, &Step::All(step), latents)?.detach();
        Ok((cond, next))
    }
}

impl Judge {
    /// The latents of `trajectory` at its current step: its noise, advanced step by step
    /// with the teacher's guided predictions (they do not depend on the student).
    pub fn replay(
        &self,
        trajectory: &Trajectory,
        sampler: &dyn Sampler,
        teacher: (&Tensor, &Tensor),
        uncond: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let n = trajectory.indices.len();
        let shape = self.latent_shape(n, trajectory.resolution);
        let time_ids = self.time_ids(n, trajectory.resolution)?;
        let mut x = trajectory.noise(shape, sampler.init_noise_sigma(), self.unet.device())?;
        for k in 0..trajectory.step {
            x = self
                .teacher_step(
                    sampler,
                    k,
                    &x,
                    &time_ids,
                    teacher,
                    uncond,
                    &trajectory.guidance,
                )?
                .1;
        }
        Ok(x)
    }

    /// The held-out vision loss at fixed noise: for each caption (its position seeds the
    /// noise), the teacher's trajectory at the middle guidance is followed to the middle
    /// step, where student and teacher predictions are compared.
    pub fn eval_loss(
        &self,
        indices: &[usize],
        student: (&Tensor, &Tensor),
        teacher: (&Tensor, &Tensor),
        uncond: (&Tensor, &Tensor),
        cfg: &VisionConfig,
    ) -> Result<f64> {
        let sampler = self.sampler(cfg.sampler, cfg.denoise_steps)?;
        let grid = cfg.guidance_grid();
        let middle = grid[grid.len() / 2];
        let n = indices.len();
        let shape = self.latent_shape(1, cfg.resolution);
        let noise = indices
            .iter()
            .map(|&i| {
                Trajectory {
                    indices: vec![i],
                    seed: EVAL_SEED ^ i as u64,
                    guidance: vec![middle],
                    resolution: cfg.resolution,
                    denoise_steps: cfg.denoise_steps,
                    sampler: cfg.sampler,
                    step: 0,
                }
                .noise(shape, sampler.init_noise_sigma(), self.unet.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let walk = Trajectory {
            indices: indices.to_vec(),
            seed: 0,
            guidance: vec![middle; n],
            resolution: cfg.resolution,
            denoise_steps: cfg.denoise_steps,
            sampler: cfg.sampler,
            step: cfg.denoise_steps / 2,
        };
        let time_ids = self.time_ids(n, cfg.resolution)?;
        let mut x = Tensor::cat(&noise, 0)?;
        for k in 0..walk.step {
            x = self
                .teacher_step(
                    sampler.as_ref(),
                    k,
                    &x,
                    &time_ids,
                    teacher,
                    uncond,
                    &walk.guidance,
                )?
                .1;
        }
        let k = walk.step;
        let want = self.predict(
            sampler.as_ref(),
            k,
            &x,
            &time_ids,
            teacher,
            ForwardMode::Fast,
        )?;
        let got = self.predict(
            sampler.as_ref(),
            k,
            &x,
            &time_ids,
            student,
            ForwardMode::Fast,
        )?;
        Ok(vision_loss(&got, &want)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }
}

/// Seeds the held-out noise (with each caption's position).
const EVAL_SEED: u64 = 0xE7A1_5EED;

/// The vision loss: per sample, the mean squared difference of the two predictions; then the
/// batch mean.
pub fn vision_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let per_sample = (student - teacher)?
        .sqr()?
        .flatten_from(1)?
        .mean(D::Minus1)?;
    Ok(per_sample.mean_all()?)
}
