//! SDXL samplers, numerically identical to diffusers' (float32, CPU): the training noise
//! schedule ([`schedule`]), a `scheduler_config.json` ([`config`]), timestep spacing
//! ([`timesteps`]), [`Euler`] (`EulerDiscreteScheduler`, SDXL's default) and [`Ddim`]
//! (`DDIMScheduler`, eta = 0), plus what a trainer needs around them: the UNet's timestep
//! input, a prediction split into `x0` / `eps` ([`prediction`]) and classifier-free guidance
//! ([`guidance`]).
//!
//! The schedulers hold no state between steps: every call names its step index, shared by
//! the batch or one per sample ([`Step`]), so a batch may sit at different points of its
//! trajectories. Tensors may have any shape whose first dimension is the batch. Work is
//! done in float32 (diffusers' Euler upcasts too); results come back in the model output's
//! dtype (`step`, `scale_model_input`: the sample's) or float32 (`denoise`, `guide`).
//! Everything is candle ops, so gradients flow through `denoise` and `guide`.
//!
//! A diffusers loop, step `i` of `n`:
//! ```text
//! x = noise * init_noise_sigma
//! for i in 0..n:
//!     out = unet(scale_model_input(x, i), timestep_input(i), ..)
//!     out = guide(out_uncond, out_cond, g)
//!     x = step(out, i, x)
//! ```

pub mod batch;
pub mod config;
pub mod ddim;
pub mod euler;
pub mod guidance;
pub mod prediction;
pub mod schedule;
pub mod timesteps;

pub use batch::{Batch, Step};
pub use config::{SchedulerConfig, SDXL_SCHEDULER_CONFIG};
pub use ddim::Ddim;
pub use euler::Euler;
pub use guidance::guide;
pub use prediction::{denoise_vp, Denoised, PredictionType};
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use timesteps::TimestepSpacing;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// What the sampling loop and the trainer ask of a scheduler after `set_timesteps(n)`.
pub trait Sampler {
    /// `n`, the number of denoising steps.
    fn num_steps(&self) -> usize;

    fn prediction_type(&self) -> PredictionType;

    /// The timestep the UNet is given at `step` (diffusers' `scheduler.timesteps[step]`).
    fn timestep(&self, step: usize) -> Result<f32>;

    /// The scale of the starting noise: `x_T = noise * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64;

    /// The UNet's input for `sample` at `step`.
    fn scale_model_input(&self, sample: &Tensor, step: &Step) -> Result<Tensor>;

    /// The UNet's timestep input for a batch: `[batch]` float32.
    fn timestep_input(&self, step: &Step, batch: usize, device: &Device) -> Result<Tensor>;

    /// The prediction at `step` split into the clean sample and the noise (float32).
    fn denoise(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Denoised>;

    /// The sample after `step` (diffusers' `step(..).prev_sample`).
    fn step(&self, model_output: &Tensor, step: &Step, sample: &Tensor) -> Result<Tensor>;
}

/// A model output must have its sample's shape.
pub(crate) fn check_pair(model_output: &Tensor, sample: &Tensor) -> Result<()> {
    if model_output.dims() == sample.dims() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "model output {:?} and sample {:?} differ in shape",
            model_output.dims(),
            sample.dims()
        )))
    }
}
