//! diffusers' `ResnetBlock2D` as SDXL configures it (LDM `ResBlock`): group norm, SiLU,
//! 3x3 convolution, plus the projected time embedding; group norm, SiLU, (dropout: none in a
//! frozen model), 3x3 convolution; a 1x1 convolution on the shortcut when the channels change.

use candle_core::{Result, Tensor};

use super::layers::{Conv2d, GroupNorm, Linear};
use super::load::Source;
use super::schema::ResnetSpec;

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn load(spec: &ResnetSpec, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(&spec.norm1, src)?,
            conv1: Conv2d::load(&spec.conv1, src)?,
            time_emb_proj: Linear::load(&spec.time_emb_proj, src)?,
            norm2: GroupNorm::load(&spec.norm2, src)?,
            conv2: Conv2d::load(&spec.conv2, src)?,
            conv_shortcut: spec
                .conv_shortcut
                .as_ref()
                .map(|s| Conv2d::load(s, src))
                .transpose()?,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// `x` `[B, C_in, H, W]`; `temb_act`: `silu(time embedding)` `[B, T]` (diffusers applies
    /// the SiLU inside every resnet; the UNet computes it once).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
