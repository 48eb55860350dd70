//! The UNet's frozen layers: linear, convolution, group norm and layer norm. Weights are
//! plain tensors (never `Var`s); each forward records a gradient for its input only.

use candle_core::{Result, Tensor};

use super::load::Source;
use super::schema::{ConvSpec, LinearSpec, NormSpec, Site};
use crate::ops::{self, Conv2dParams, ForwardMode};

/// `x @ w.T + b` (torch `nn.Linear`).
#[derive(Debug, Clone)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(spec: &LinearSpec, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(&spec.site, "weight")?,
            b: Some(src.get(&spec.site, "bias")?),
        })
    }

    /// A linear without bias, `[out, in]` named `{site}.{field}`.
    pub(crate) fn load_weight(site: &Site, field: &str, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(site, field)?,
            b: None,
        })
    }

    /// A linear `{site}.weight` + `{site}.bias`; a 1x1 convolution's `[out, in, 1, 1]`
    /// weight is read as `[out, in]` (the same map on `[.., C]` rows).
    pub(crate) fn load_site(site: &Site, src: &Source) -> crate::Result<Self> {
        let w = src.get(site, "weight")?;
        let w = match w.dims() {
            &[o, i, 1, 1] => w.reshape((o, i))?,
            _ => w,
        };
        Ok(Self {
            w,
            b: Some(src.get(site, "bias")?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::frozen_linear(x, &self.w)?;
        match &self.b {
            Some(b) => ops::add_frozen_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// `conv2d(x, w) + b` (torch `nn.Conv2d`, square kernel).
#[derive(Debug, Clone)]
pub struct Conv2d {
    w: Tensor,
    b: Tensor,
    params: Conv2dParams,
}

impl Conv2d {
    pub(crate) fn load(spec: &ConvSpec, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(&spec.site, "weight")?,
            b: src.get(&spec.site, "bias")?,
            params: Conv2dParams {
                stride: spec.stride,
                padding: spec.padding,
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::frozen_conv2d(x, &self.w, Some(&self.b), self.params)
    }
}

/// torch `nn.GroupNorm` with an affine weight and bias, over `[B, C, ...]`, statistics in
/// f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn load(spec: &NormSpec, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(&spec.site, "weight")?,
            b: src.get(&spec.site, "bias")?,
            groups: spec.groups,
            eps: spec.eps,
        })
    }

    /// A group norm of a transformer (`{site}.norm`, eps fixed by diffusers).
    pub(crate) fn load_named(
        site: &Site,
        field: &str,
        groups: usize,
        eps: f64,
        src: &Source,
    ) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(site, &format!("{field}.weight"))?,
            b: src.get(site, &format!("{field}.bias"))?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, &self.w, &self.b, self.groups, self.eps, false)
    }

    /// `silu(group_norm(x))`, fused where the kernel applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, &self.w, &self.b, self.groups, self.eps, true)
    }
}

/// torch `nn.LayerNorm` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(site: &Site, field: &str, eps: f64, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            w: src.get(site, &format!("{field}.weight"))?,
            b: src.get(site, &format!("{field}.bias"))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, path: ForwardMode) -> Result<Tensor> {
        let dtype = x.dtype();
        let compute = ops::compute_dtype(dtype);
        if compute == dtype {
            return ops::layer_norm(x, &self.w, &self.b, self.eps, path);
        }
        let (w, b) = (self.w.to_dtype(compute)?, self.b.to_dtype(compute)?);
        ops::layer_norm(&x.to_dtype(compute)?, &w, &b, self.eps, path)?.to_dtype(dtype)
    }
}
