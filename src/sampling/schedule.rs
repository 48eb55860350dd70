//! The training noise schedule: betas, `alphas_cumprod` and the matching sigmas, computed the
//! way diffusers' `EulerDiscreteScheduler` / `DDIMScheduler` `__init__` do (float32 values,
//! as `torch` holds them).

use crate::error::{Error, Result};

/// How betas go from `beta_start` to `beta_end` (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, N)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2`: Stable Diffusion's and SDXL's.
    ScaledLinear,
}

impl BetaSchedule {
    /// diffusers' spelling; `None` for anything else (the config names the field).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Self::Linear),
            "scaled_linear" => Some(Self::ScaledLinear),
            _ => None,
        }
    }
}

/// `betas`, `alphas_cumprod` and sigmas over the `N` training timesteps.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
}

impl NoiseSchedule {
    /// SDXL's: `scaled_linear` from 0.00085 to 0.012 over 1000 steps.
    pub fn sdxl() -> Self {
        Self::new(1000, 0.00085, 0.012, BetaSchedule::ScaledLinear)
            .expect("SDXL's schedule is valid")
    }

    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        schedule: BetaSchedule,
    ) -> Result<Self> {
        if num_train_timesteps < 2 {
            return Err(Error::Invalid(format!(
                "num_train_timesteps must be at least 2, got {num_train_timesteps}"
            )));
        }
        let ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
        if !ok(beta_start) || !ok(beta_end) {
            return Err(Error::Invalid(format!(
                "betas must lie in (0, 1): beta_start {beta_start}, beta_end {beta_end}"
            )));
        }
        // torch.linspace in float32 (values as float32, squared in float32 for scaled_linear).
        let betas: Vec<f32> = match schedule {
            BetaSchedule::Linear => linspace_f32(beta_start, beta_end, num_train_timesteps),
            BetaSchedule::ScaledLinear => {
                linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
        };
        // torch.cumprod on CPU accumulates float32 in double and rounds every output.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect();
        // ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, in float32.
        let sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect();
        Ok(Self {
            betas,
            alphas_cumprod,
            sigmas,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// `prod(1 - beta)` up to each timestep: the signal fraction of `x_t`.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `sqrt((1 - alphas_cumprod) / alphas_cumprod)` per training timestep (ascending in `t`;
    /// diffusers stores them reversed).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The sigma at a fractional timestep: `np.interp` over the training sigmas in float64,
    /// clamped at both ends, rounded to float32 (diffusers' `interpolation_type = "linear"`).
    pub fn sigma_at(&self, t: f64) -> f32 {
        let s = &self.sigmas;
        let last = s.len() - 1;
        if t.is_nan() {
            return f32::NAN;
        }
        if t <= 0.0 {
            return s[0];
        }
        if t >= last as f64 {
            return s[last];
        }
        let j = t.floor() as usize;
        let (lo, hi) = (f64::from(s[j]), f64::from(s[j + 1]));
        if t == j as f64 {
            return s[j];
        }
        ((hi - lo) * (t - j as f64) + lo) as f32
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: each value within one float32 rounding of
/// the exact one (torch's vectorised kernel itself differs from its scalar one by an ulp).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}
