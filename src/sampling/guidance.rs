//! Classifier-free guidance, as diffusers' SDXL pipeline combines the two predictions.

use candle_core::Tensor;

use super::batch::{as_f32, Batch};
use crate::error::{Error, Result};

/// `uncond + scale * (cond - uncond)` (the guidance scale shared or one per sample), in
/// float32; gradients flow to both predictions.
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: &Batch<f64>) -> Result<Tensor> {
    if uncond.dims() != cond.dims() {
        return Err(Error::Invalid(format!(
            "guidance: unconditional prediction {:?} and conditional {:?} differ in shape",
            uncond.dims(),
            cond.dims()
        )));
    }
    let (u, c) = (as_f32(uncond)?, as_f32(cond)?);
    let g = scale.try_map(|g| Ok(g as f32))?.coeff(&u)?;
    Ok(u.broadcast_add(&(c - &u)?.broadcast_mul(&g)?)?)
}
