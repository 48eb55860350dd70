//! diffusers' `DDIMScheduler`, deterministic (`eta = 0`).
//!
//! The sample is the variance-preserving `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps` the UNet
//! sees directly. A step goes from timestep `t` to `t - N / n` (integer division, whatever
//! the spacing, as diffusers does), using `final_alpha_cumprod` (1 with `set_alpha_to_one`,
//! else `alphas_cumprod[0]`) once that falls below 0.

use candle_core::{Device, Tensor};

use super::batch::{Batch, Step};
use super::config::{Class, Resolved, SchedulerConfig};
use super::prediction::{denoise_vp, Denoised, PredictionType};
use super::schedule::NoiseSchedule;
use super::{check_pair, Sampler};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Ddim {
    cfg: Resolved,
    timesteps: Vec<usize>,
    final_alpha_cumprod: f32,
}

impl Ddim {
    /// The scheduler after `set_timesteps(num_steps)`.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let cfg = config.resolve(Class::Ddim)?;
        let n_train = cfg.schedule.num_train_timesteps();
        let timesteps = cfg
            .spacing
            .timesteps(n_train, num_steps, cfg.steps_offset)?
            .into_iter()
            .map(|t| t.round_ties_even() as usize)
            .collect::<Vec<_>>();
        if let Some(&t) = timesteps.iter().find(|&&t| t >= n_train) {
            return Err(Error::Invalid(format!(
                "timestep {t} (steps_offset {}) is beyond the {n_train} training timesteps",
                cfg.steps_offset
            )));
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            cfg.schedule.alphas_cumprod()[0]
        };
        Ok(Self {
            cfg,
            timesteps,
            final_alpha_cumprod,
        })
    }

    /// The timesteps, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.cfg.schedule
    }

    /// `alphas_cumprod` at the step's timestep and at the one it steps to.
    pub fn alpha_prods(&self, step: usize) -> Result<(f32, f32)> {
        let n = self.timesteps.len();
        if step >= n {
            return Err(Error::Invalid(format!(
                "step index {step} is out of range for {n} steps"
            )));
        }
        let ac = self.cfg.schedule.alphas_cumprod();
        let t = self.timesteps[step];
        let ratio = ac.len() / n;
        let prev = match t.checked_sub(ratio) {
            Some(p) => ac[p],
            None => self.final_alpha_cumprod,
        };
        Ok((ac[t], prev))
    }

    fn alphas(&self, step: &Step) -> Result<(Batch<f32>, Batch<f32>)> {
        let now = step.try_map(|i| Ok(self.alpha_prods(i)?.0))?;
        let prev = step.try_map(|i| Ok(self.alpha_prods(i)?.1))?;
        Ok((now, prev))
    }

    fn split(
        &self,
        model_output: &Tensor,
        alpha: &Batch<f32>,
        sample: &Tensor,
    ) -> Result<Denoised> {
        check_pair(model_output, sample)?;
        let mut d = denoise_vp(self.cfg.prediction, model_output, sample, alpha)?;
        if let Some(r) = self.cfg.clip_sample {
            d.x0 = d.x0.clamp(-r, r)?;
        }
        Ok(d)
    }
}

impl Sampler for Ddim {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn prediction_type(&self) -> PredictionType {
        self.cfg.prediction
    }

    fn timestep(&self, step: usize) -> Result<f32> {
        self.alpha_prods(step)?;
        Ok(self.timesteps[step] as f32)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The identity (DDIM's model input is the sample itself).
    fn scale_model_input(&self, sample: &Tensor, step: &Step) -> Result<Tensor> {
        self.alphas(step)?;
        Ok(sample.clone())
    }

    fn timestep_input(&self, step: &Step, batch: usize, device: &Device) -> Result<Tensor> {
        let t = step
            .expand(batch)?
            .into_iter()
            .map(|i| self.timestep(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::from_vec(t, batch, device)?)
    }

    /// `x0` (clamped when `clip_sample` is on, as in `step`) and `eps`.
    fn denoise(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Denoised> {
        self.split(model_output, &self.alphas(step)?.0, sample)
    }

    /// `sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`, in the model output's dtype.
    fn step(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Tensor> {
        let (now, prev) = self.alphas(step)?;
        let d = self.split(model_output, &now, sample)?;
        let sqrt_prev = prev.try_map(|a| Ok(a.sqrt()))?.coeff(&d.x0)?;
        let direction = prev.try_map(|a| Ok((1.0f32 - a).sqrt()))?.coeff(&d.x0)?;
        let out =
            d.x0.broadcast_mul(&sqrt_prev)?
                .broadcast_add(&d.eps.broadcast_mul(&direction)?)?;
        Ok(out.to_dtype(model_output.dtype())?)
    }
}
