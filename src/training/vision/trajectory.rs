//! One batch's walk down the teacher's sampling trajectory. Only what makes it is saved (the
//! captions, the noise seed, the guidance drawn, the settings it started with, the step it is
//! at): the latents at step `k` are the seeded noise advanced `k` times with the teacher's
//! guided predictions, which do not depend on the student, so a resumed run replays them
//! exactly.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{SamplerKind, VisionConfig};
use crate::error::Result;
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Positions of its captions in the run's caption list.
    pub indices: Vec<usize>,
    /// Seed of the starting noise.
    pub seed: u64,
    /// Guidance per caption.
    pub guidance: Vec<f64>,
    pub resolution: usize,
    pub denoise_steps: usize,
    pub sampler: SamplerKind,
    /// Denoising steps trained so far.
    pub step: usize,
}

impl Trajectory {
    /// A new trajectory for `indices`, its noise seed and guidance drawn from `rng`.
    pub fn new(indices: Vec<usize>, cfg: &VisionConfig, rng: &mut Rng) -> Self {
        let grid = cfg.guidance_grid();
        let seed = rng.next_u64();
        let guidance = indices
            .iter()
            .map(|_| grid[rng.below(grid.len())])
            .collect();
        Self {
            indices,
            seed,
            guidance,
            resolution: cfg.resolution,
            denoise_steps: cfg.denoise_steps,
            sampler: cfg.sampler,
            step: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.denoise_steps
    }

    /// The starting latents: seeded standard normal noise of `shape`, times `sigma` (the
    /// sampler's initial noise scale).
    pub fn noise(
        &self,
        shape: (usize, usize, usize, usize),
        sigma: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let values = Rng::new(self.seed).normal_vec(n, sigma);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(device)?)
    }
}
