//! AdamW with parameter groups, global gradient-norm clipping and moments we own, so a
//! checkpoint can hold them and a resumed run continues bit for bit (candle's `AdamW` has
//! neither groups, clipping nor access to its state).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One trainable tensor with its AdamW moments.
pub struct Param {
    pub var: Var,
    /// Index into the optimizer's groups (learning rate).
    pub group: usize,
    /// Weight decay applies to matrices only, not to biases, norms or latents' scale.
    pub decay: bool,
    m: Tensor,
    v: Tensor,
}

/// Trainable parameters by name, their moments and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: BTreeMap<String, Param>,
    /// Optimizer steps taken (bias correction uses it).
    pub t: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            params: BTreeMap::new(),
            t: 0,
        }
    }

    pub fn add(&mut self, name: String, var: Var, group: usize, decay: bool) -> Result<()> {
        if var.dtype() != DType::F32 {
            return Err(Error::Invalid(format!(
                "trainable `{name}` must be f32, is {:?}",
                var.dtype()
            )));
        }
        let m = var.zeros_like()?;
        let v = var.zeros_like()?;
        self.params.insert(
            name,
            Param {
                var,
                group,
                decay,
                m,
                v,
            },
        );
        Ok(())
    }

    /// One AdamW update (PyTorch semantics: decoupled decay, bias-corrected moments) with
    /// `lrs[group]` from gradients already accumulated and clipped by the caller.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lrs: &[f64]) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (name, p) in self.params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let lr = lrs[p.group];
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let w = p.var.as_tensor();
            let w = if p.decay {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            let update = ((&p.m / bc1)? / ((&p.v / bc2)?.sqrt()? + c.eps)?)?;
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn moments(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.params
            .iter()
            .flat_map(|(n, p)| [(format!("m.{n}"), &p.m), (format!("v.{n}"), &p.v)])
    }

    /// Restores moments saved by [`AdamW::moments`].
    pub fn set_moments(&mut self, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (n, p) in self.params.iter_mut() {
            p.m = get(&format!("m.{n}"))?;
            p.v = get(&format!("v.{n}"))?;
        }
        Ok(())
    }
}

/// Global L2 norm of a set of gradients.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (no-op when `max_norm <= 0`).
pub fn clip(grads: &mut BTreeMap<String, Tensor>, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(())
}
