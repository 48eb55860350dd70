//! What the UNet predicts (diffusers' `prediction_type`) and its conversion to the clean
//! sample `x0` and the noise `eps`.

use candle_core::Tensor;

use super::batch::{as_f32, Batch};
use crate::error::Result;

/// diffusers' `prediction_type`. SDXL base predicts `epsilon`; some fine-tunes `v_prediction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

impl PredictionType {
    /// diffusers' spelling; `None` for anything else (the config names the field).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "epsilon" => Some(Self::Epsilon),
            "v_prediction" => Some(Self::VPrediction),
            _ => None,
        }
    }

    /// diffusers' spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
        }
    }
}

/// A prediction split into the clean sample and the noise (float32).
#[derive(Debug, Clone)]
pub struct Denoised {
    pub x0: Tensor,
    pub eps: Tensor,
}

/// Splits `model_output` for the variance-preserving sample the UNet sees,
/// `x_t = sqrt(a) * x0 + sqrt(1 - a) * eps` with `a = alphas_cumprod[t]` (shared or per
/// sample), into `x0` and `eps`, with the operations of diffusers' `DDIMScheduler.step`:
/// - epsilon: `x0 = (x_t - sqrt(1 - a) * out) / sqrt(a)`, `eps = out`;
/// - v: `x0 = sqrt(a) * x_t - sqrt(1 - a) * out`, `eps = sqrt(a) * out + sqrt(1 - a) * x_t`.
///
/// Both come out in float32, whatever the inputs' dtype; gradients flow to both inputs.
pub fn denoise_vp(
    kind: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod: &Batch<f32>,
) -> Result<Denoised> {
    let (out, x) = (as_f32(model_output)?, as_f32(sample)?);
    // float32 scalars, as torch computes `alpha_prod_t ** 0.5` and `(1 - alpha_prod_t) ** 0.5`.
    let sqrt_a = alpha_prod.try_map(|a| Ok(a.sqrt()))?.coeff(&x)?;
    let sqrt_b = alpha_prod.try_map(|a| Ok((1.0f32 - a).sqrt()))?.coeff(&x)?;
    Ok(match kind {
        PredictionType::Epsilon => Denoised {
            x0: x
                .broadcast_sub(&out.broadcast_mul(&sqrt_b)?)?
                .broadcast_div(&sqrt_a)?,
            eps: out,
        },
        PredictionType::VPrediction => Denoised {
            x0: x
                .broadcast_mul(&sqrt_a)?
                .broadcast_sub(&out.broadcast_mul(&sqrt_b)?)?,
            eps: out
                .broadcast_mul(&sqrt_a)?
                .broadcast_add(&x.broadcast_mul(&sqrt_b)?)?,
        },
    })
}
