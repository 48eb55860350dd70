//! Which training timesteps an `n`-step sampling run visits (diffusers' `timestep_spacing`),
//! computed with numpy's arithmetic so the values are the ones diffusers gets.

use crate::error::{Error, Result};

/// diffusers' `timestep_spacing` (see table 2 of "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `linspace(0, N - 1, n)`, descending (Euler keeps the fractions, DDIM rounds them).
    Linspace,
    /// `arange(n) * (N // n) + steps_offset`, descending: SDXL's (with `steps_offset` 1).
    Leading,
    /// `round(arange(N, 0, -N / n)) - 1`.
    Trailing,
}

impl TimestepSpacing {
    /// diffusers' spelling; `None` for anything else (the config names the field).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "linspace" => Some(Self::Linspace),
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Linspace => "linspace",
            Self::Leading => "leading",
            Self::Trailing => "trailing",
        }
    }

    /// The `n` timesteps, descending, as float64 values before any rounding to the
    /// scheduler's dtype. `Linspace` values are fractional; callers round or keep them.
    pub(crate) fn timesteps(
        self,
        num_train_timesteps: usize,
        n: usize,
        steps_offset: usize,
    ) -> Result<Vec<f64>> {
        let big_n = num_train_timesteps;
        if n == 0 || n > big_n {
            return Err(Error::Invalid(format!(
                "number of sampling steps must be in 1..={big_n} (num_train_timesteps), got {n}"
            )));
        }
        let t = match self {
            TimestepSpacing::Linspace => {
                // np.linspace(0, N - 1, n): i * step, the last value exactly N - 1.
                let stop = (big_n - 1) as f64;
                let mut t: Vec<f64> = if n == 1 {
                    vec![0.0]
                } else {
                    let step = stop / (n - 1) as f64;
                    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step).collect();
                    v[n - 1] = stop;
                    v
                };
                t.reverse();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = big_n / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.arange(N, 0, -N / n): length ceil(N / (N / n)); values start + i * delta
                // with delta = (start + step) - start (numpy's fill); then round half to even.
                let start = big_n as f64;
                let step = -(big_n as f64 / n as f64);
                let len = ((0.0 - start) / step).ceil() as usize;
                let delta = (start + step) - start;
                (0..len)
                    .map(|i| {
                        let v = if i == 1 {
                            start + step
                        } else {
                            start + i as f64 * delta
                        };
                        v.round_ties_even() - 1.0
                    })
                    .collect::<Vec<f64>>()
            }
        };
        // numpy's arange can make one value too many (N = 1000: n = 61, 103, 121, ...), which
        // diffusers keeps as a timestep of -1: refused rather than copied.
        if t.len() != n || t.iter().any(|&v| v < 0.0) {
            return Err(Error::Invalid(format!(
                "timestep_spacing \"{}\" with {n} steps over {big_n} gives diffusers {} \
                 timesteps down to {} (numpy rounding); choose another number of steps",
                self.name(),
                t.len(),
                t.last().copied().unwrap_or(0.0)
            )));
        }
        Ok(t)
    }
}
