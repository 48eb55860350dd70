//! The time conditioning: diffusers' sinusoidal `Timesteps` (`get_timestep_embedding`) and
//! `TimestepEmbedding` (linear, SiLU, linear), used twice: for the diffusion timestep
//! (`time_proj` + `time_embedding`) and for SDXL's size ids next to the pooled text embedding
//! (`add_time_proj` + `add_embedding`, `addition_embed_type: "text_time"`).

use candle_core::{DType, Result, Tensor};

use super::layers::Linear;
use super::load::Source;
use super::schema::LinearSpec;

/// `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)` for each value of
/// `t` `[N]`: `[N, dim]`, `[sin | cos]` (or `[cos | sin]` when `flip`) of
/// `t * exp(-ln(10000) i / (dim/2 - shift))`. Computed in f32 from f32 timesteps as diffusers
/// does (its `Timesteps` always returns f32, whatever the model's dtype), then cast to `dtype`.
/// `dim` is even (checked by the config).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip: bool,
    shift: usize,
    dtype: DType,
) -> Result<Tensor> {
    let ts = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln * i as f32 / (half as f32 - shift as f32)).exp())
        .collect();
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &t in &ts {
        let args = freqs.iter().map(|&f| t * f);
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
        if flip {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
    }
    Tensor::from_vec(out, (ts.len(), dim), t.device())?.to_dtype(dtype)
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn load(l1: &LinearSpec, l2: &LinearSpec, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            linear_1: Linear::load(l1, src)?,
            linear_2: Linear::load(l2, src)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
