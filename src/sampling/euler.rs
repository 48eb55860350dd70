//! diffusers' `EulerDiscreteScheduler` (SDXL's default sampler), deterministic (`s_churn = 0`).
//!
//! The sample lives in sigma space, `x = x0 + sigma * eps`; the UNet sees
//! `x / sqrt(sigma^2 + 1)`. Every float32 scalar and tensor operation follows diffusers'
//! `set_timesteps`, `scale_model_input` and `step`, in the same order.

use candle_core::{Device, Tensor};

use super::batch::{as_f32, Batch, Step};
use super::config::{Class, Resolved, SchedulerConfig};
use super::prediction::{Denoised, PredictionType};
use super::schedule::NoiseSchedule;
use super::timesteps::TimestepSpacing;
use super::{check_pair, Sampler};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Euler {
    cfg: Resolved,
    timesteps: Vec<f32>,
    /// One per step plus the final 0.
    sigmas: Vec<f32>,
}

impl Euler {
    /// The scheduler after `set_timesteps(num_steps)`.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let cfg = config.resolve(Class::Euler)?;
        let n_train = cfg.schedule.num_train_timesteps();
        let timesteps: Vec<f32> = cfg
            .spacing
            .timesteps(n_train, num_steps, cfg.steps_offset)?
            .into_iter()
            .map(|t| t as f32)
            .collect();
        // np.interp(timesteps, arange(N), sigmas) then a final 0, as float32.
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| cfg.schedule.sigma_at(f64::from(t)))
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            cfg,
            timesteps,
            sigmas,
        })
    }

    /// The timesteps, descending, as float32 (fractional for `linspace` spacing).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sigma of every step, then the final 0 (`num_steps + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.cfg.schedule
    }

    fn sigma(&self, step: &Step) -> Result<Batch<f32>> {
        step.try_map(|i| {
            self.check(i)?;
            Ok(self.sigmas[i])
        })
    }

    fn check(&self, i: usize) -> Result<()> {
        if i < self.timesteps.len() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "step index {i} is out of range for {} steps",
                self.timesteps.len()
            )))
        }
    }

    /// `x0` of diffusers' `step`, in float32, with the sigma coefficient tensor.
    fn x0(&self, out: &Tensor, x: &Tensor, sigma: &Batch<f32>) -> Result<(Tensor, Tensor)> {
        let s = sigma.coeff(x)?;
        let x0 = match self.cfg.prediction {
            // sample - sigma_hat * model_output
            PredictionType::Epsilon => x.broadcast_sub(&out.broadcast_mul(&s)?)?,
            // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
            PredictionType::VPrediction => {
                let c_out = sigma.try_map(|s| Ok(-s / (s * s + 1.0).sqrt()))?.coeff(x)?;
                let c_skip = sigma.try_map(|s| Ok(s * s + 1.0))?.coeff(x)?;
                out.broadcast_mul(&c_out)?
                    .broadcast_add(&x.broadcast_div(&c_skip)?)?
            }
        };
        Ok((x0, s))
    }
}

impl Sampler for Euler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn prediction_type(&self) -> PredictionType {
        self.cfg.prediction
    }

    fn timestep(&self, step: usize) -> Result<f32> {
        self.check(step)?;
        Ok(self.timesteps[step])
    }

    /// `max(sigmas)` for linspace / trailing spacing, `sqrt(max^2 + 1)` for leading.
    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::MIN, f32::max);
        match self.cfg.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
        }
    }

    /// `sample / sqrt(sigma^2 + 1)`, in the sample's dtype.
    fn scale_model_input(&self, sample: &Tensor, step: &Step) -> Result<Tensor> {
        let x = as_f32(sample)?;
        let d = self
            .sigma(step)?
            .try_map(|s| Ok((s * s + 1.0).sqrt()))?
            .coeff(&x)?;
        Ok(x.broadcast_div(&d)?.to_dtype(sample.dtype())?)
    }

    fn timestep_input(&self, step: &Step, batch: usize, device: &Device) -> Result<Tensor> {
        let t = step
            .expand(batch)?
            .into_iter()
            .map(|i| self.timestep(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::from_vec(t, batch, device)?)
    }

    /// `x0` as in `step`; `eps` = `model_output` (epsilon) or `(sample - x0) / sigma` (v).
    fn denoise(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Denoised> {
        check_pair(model_output, sample)?;
        let (out, x) = (as_f32(model_output)?, as_f32(sample)?);
        let (x0, s) = self.x0(&out, &x, &self.sigma(step)?)?;
        let eps = match self.cfg.prediction {
            PredictionType::Epsilon => out,
            PredictionType::VPrediction => (&x - &x0)?.broadcast_div(&s)?,
        };
        Ok(Denoised { x0, eps })
    }

    /// `x + (x - x0) / sigma * (sigma_next - sigma)`, in the model output's dtype.
    fn step(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Tensor> {
        check_pair(model_output, sample)?;
        let (out, x) = (as_f32(model_output)?, as_f32(sample)?);
        let sigma = self.sigma(step)?;
        let (x0, s) = self.x0(&out, &x, &sigma)?;
        let derivative = (&x - &x0)?.broadcast_div(&s)?;
        let dt = step
            .try_map(|i| Ok(self.sigmas[i + 1] - self.sigmas[i]))?
            .coeff(&x)?;
        let prev = x.broadcast_add(&derivative.broadcast_mul(&dt)?)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}
