//! diffusers' `Transformer2DModel` over continuous input (LDM `SpatialTransformer`) and its
//! `BasicTransformerBlock`s, as SDXL configures them: group norm, `proj_in`, per block
//! LayerNorm + self-attention, LayerNorm + cross-attention over the text conditioning (any
//! length), LayerNorm + GEGLU feed-forward (exact GELU), each with a residual; `proj_out`
//! and the residual around the whole. No attention bias on q/k/v, no masks, dropout absent.
//!
//! Each transformer block is one recomputation unit ([`super::checkpoint`]), and so are the
//! input (norm + `proj_in`) and output (`proj_out` + residual) around them.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::checkpoint::checkpointed;
use super::layers::{GroupNorm, LayerNorm, Linear};
use super::load::Source;
use super::schema::{Site, TransformerSpec, LAYER_NORM_EPS, TRANSFORMER_GROUP_NORM_EPS};
use crate::ops::{self, ForwardMode};

/// diffusers' `Attention` with the default processor: `to_out(sdpa(to_q(x), to_k(c), to_v(c)))`.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(site: &Site, name: &str, heads: usize, src: &Source) -> crate::Result<Self> {
        let w = |p: &str| Linear::load_weight(site, &format!("{name}.{p}.weight"), src);
        Ok(Self {
            to_q: w("to_q")?,
            to_k: w("to_k")?,
            to_v: w("to_v")?,
            to_out: Linear::load_site(&site_of(site, &format!("{name}.to_out.0")), src)?,
            heads,
        })
    }

    /// `x` `[B, T, C]` attends over `context` `[B, S, D]`.
    fn forward(&self, x: &Tensor, context: &Tensor, path: ForwardMode) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let a = ops::full_attention(&q, &k, &v, self.heads, path)?;
        self.to_out.forward(&a)
    }
}

/// A site inside `site` with the same relative name in both layouts.
fn site_of(site: &Site, rel: &str) -> Site {
    Site {
        diffusers: format!("{}.{rel}", site.diffusers),
        ldm: format!("{}.{rel}", site.ldm),
    }
}

/// GEGLU feed-forward: `net.2(h * gelu(gate))` with `[h | gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&ops::geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers' `BasicTransformerBlock` (`norm_type: "layer_norm"`).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(site: &Site, heads: usize, src: &Source) -> crate::Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(site, "norm1", LAYER_NORM_EPS, src)?,
            attn1: Attention::load(site, "attn1", heads, src)?,
            norm2: LayerNorm::load(site, "norm2", LAYER_NORM_EPS, src)?,
            attn2: Attention::load(site, "attn2", heads, src)?,
            norm3: LayerNorm::load(site, "norm3", LAYER_NORM_EPS, src)?,
            ff: FeedForward {
                proj: Linear::load_site(&site_of(site, "ff.net.0.proj"), src)?,
                out: Linear::load_site(&site_of(site, "ff.net.2"), src)?,
            },
        })
    }

    /// `x` `[B, HW, C]`, `context` `[B, S, D]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor, path: ForwardMode) -> Result<Tensor> {
        let n = self.norm1.forward(x, path)?;
        let x = (self.attn1.forward(&n, &n, path)? + x)?;
        let n = self.norm2.forward(&x, path)?;
        let x = (self.attn2.forward(&n, context, path)? + x)?;
        let n = self.norm3.forward(&x, path)?;
        self.ff.forward(&n)? + x
    }
}

/// diffusers' `Transformer2DModel` over `[B, C, H, W]`.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<Arc<BasicTransformerBlock>>,
    proj_out: Linear,
}

impl Transformer2D {
    pub(crate) fn load(spec: &TransformerSpec, src: &Source) -> crate::Result<Self> {
        let s = &spec.site;
        Ok(Self {
            norm: GroupNorm::load_named(s, "norm", spec.groups, TRANSFORMER_GROUP_NORM_EPS, src)?,
            proj_in: Linear::load_site(&site_of(s, "proj_in"), src)?,
            blocks: (0..spec.depth)
                .map(|i| BasicTransformerBlock::load(&spec.block(i), spec.heads, src).map(Arc::new))
                .collect::<crate::Result<_>>()?,
            proj_out: Linear::load_site(&site_of(s, "proj_out"), src)?,
        })
    }

    /// Group norm, pixels to rows, `proj_in`: `[B, C, H, W]` -> `[B, HW, C]`.
    fn enter(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.norm.forward(x)?;
        let rows = n.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        self.proj_in.forward(&rows)
    }

    /// `proj_out`, rows back to pixels, plus the residual `x` `[B, C, H, W]`.
    fn exit(&self, rows: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let out = self.proj_out.forward(rows)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }

    /// `x` `[B, C, H, W]` with the text conditioning `context` `[B, S, D]`; each block
    /// recomputed in the backward when `checkpoint` (see [`super::checkpoint`]).
    pub fn forward(
        self: &Arc<Self>,
        x: &Tensor,
        context: &Tensor,
        path: ForwardMode,
        checkpoint: bool,
    ) -> Result<Tensor> {
        let this = self.clone();
        let mut rows = checkpointed(
            checkpoint,
            [x],
            Arc::new(move |[x]: &[Tensor; 1]| this.enter(x)),
        )?;
        for block in &self.blocks {
            let block = block.clone();
            rows = checkpointed(
                checkpoint,
                [&rows, context],
                Arc::new(move |[h, c]: &[Tensor; 2]| block.forward(h, c, path)),
            )?;
        }
        let this = self.clone();
        checkpointed(
            checkpoint,
            [&rows, x],
            Arc::new(move |[h, x]: &[Tensor; 2]| this.exit(h, x)),
        )
    }
}
