//! diffusers' `UNet2DConditionModel` with SDXL's configuration, frozen and differentiable
//! with respect to its inputs.
//!
//! `forward` reads top to bottom like diffusers' `UNet2DConditionModel.forward`: time
//! embedding plus the `text_time` addition embedding, `conv_in`, the down blocks (keeping
//! every output as a skip), the mid block, the up blocks (each resnet eats one skip), the
//! output head. Resnets, transformer blocks, the upsampler and the output head are
//! recomputation units ([`super::checkpoint`]) when the forward records a graph.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::checkpointed;
use super::config::UNetConfig;
use super::embeddings::{timestep_embedding, TimestepEmbedding};
use super::layers::{Conv2d, GroupNorm};
use super::load::{Source, UNetOrigin};
use super::resnet::ResnetBlock2D;
use super::schema::{BlockSpec, Layout};
use super::transformer::Transformer2D;
use crate::error::{Error, Result};
use crate::ops::ForwardMode;

/// What the UNet is conditioned on, besides the noisy latents and the timestep.
#[derive(Debug, Clone, Copy)]
pub struct UNetConditioning<'a> {
    /// Text token embeddings `[B, S, cross_attention_dim]` (SDXL: `[B, 77, 2048]`), any `S`.
    pub encoder_hidden_states: &'a Tensor,
    /// The pooled text embedding `[B, P]` (SDXL: CLIP-G's projected pooled output, 1280).
    pub text_embeds: &'a Tensor,
    /// SDXL's size ids `[B, 6]` (original height, width, crop top, left, target height,
    /// width), any float or integer dtype.
    pub time_ids: &'a Tensor,
}

/// One down or up block.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Arc<Transformer2D>>,
    resample: Option<Arc<Conv2d>>,
}

impl Block {
    fn load(spec: &BlockSpec, src: &Source) -> Result<Self> {
        Ok(Self {
            resnets: spec
                .resnets
                .iter()
                .map(|r| ResnetBlock2D::load(r, src).map(Arc::new))
                .collect::<Result<_>>()?,
            attentions: spec
                .attentions
                .iter()
                .map(|t| Transformer2D::load(t, src).map(Arc::new))
                .collect::<Result<_>>()?,
            resample: spec
                .resample
                .as_ref()
                .map(|c| Conv2d::load(c, src).map(Arc::new))
                .transpose()?,
        })
    }
}

/// The output head: group norm, SiLU, `conv_out`.
#[derive(Debug, Clone)]
struct Head {
    norm: GroupNorm,
    conv: Conv2d,
}

/// A frozen SDXL-family UNet. Its weights are plain tensors: gradients reach only the
/// inputs (the conditioning, and the latents when they are tracked).
pub struct UNet {
    cfg: UNetConfig,
    dtype: DType,
    device: Device,
    origin: UNetOrigin,
    time_embedding: TimestepEmbedding,
    add_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: (Arc<ResnetBlock2D>, Arc<Transformer2D>, Arc<ResnetBlock2D>),
    up: Vec<Block>,
    head: Arc<Head>,
    checkpointing: bool,
}

impl UNet {
    /// Builds the model for `cfg` (validated) from `src`.
    pub(crate) fn build(
        cfg: UNetConfig,
        src: &Source,
        dtype: DType,
        device: &Device,
        origin: UNetOrigin,
    ) -> Result<Self> {
        let l = Layout::new(&cfg);
        Ok(Self {
            time_embedding: TimestepEmbedding::load(&l.time_linear_1, &l.time_linear_2, src)?,
            add_embedding: TimestepEmbedding::load(&l.add_linear_1, &l.add_linear_2, src)?,
            conv_in: Conv2d::load(&l.conv_in, src)?,
            down: l
                .down
                .iter()
                .map(|b| Block::load(b, src))
                .collect::<Result<_>>()?,
            mid: (
                Arc::new(ResnetBlock2D::load(&l.mid.resnets[0], src)?),
                Arc::new(Transformer2D::load(&l.mid.attention, src)?),
                Arc::new(ResnetBlock2D::load(&l.mid.resnets[1], src)?),
            ),
            up: l
                .up
                .iter()
                .map(|b| Block::load(b, src))
                .collect::<Result<_>>()?,
            head: Arc::new(Head {
                norm: GroupNorm::load(&l.norm_out, src)?,
                conv: Conv2d::load(&l.conv_out, src)?,
            }),
            cfg,
            dtype,
            device: device.clone(),
            origin,
            checkpointing: true,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where the weights were read from.
    pub fn origin(&self) -> &UNetOrigin {
        &self.origin
    }

    /// Recomputation by block in the backward pass (on by default; it only acts when the
    /// forward records a graph): the graph keeps each resnet's, transformer block's,
    /// upsampler's and the output head's inputs only, and the backward runs each block
    /// again. Off keeps every activation until the graph is dropped (SDXL at 256 px: 1146 MiB
    /// instead of 43 MiB; see the module documentation).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// diffusers' `UNet2DConditionModel(sample, timestep, encoder_hidden_states,
    /// added_cond_kwargs={"text_embeds", "time_ids"}).sample`: the model's prediction
    /// (SDXL: the noise, ε) `[B, out_channels, H, W]` for latents `sample`
    /// `[B, in_channels, H, W]` at per-sample `timesteps` `[B]` (a scalar applies to all).
    ///
    /// Gradients: pass the conditioning (and, if wanted, `sample`) as tracked tensors (`Var`s
    /// or outputs of a tracked computation) with [`ForwardMode::Differentiable`]; `backward()`
    /// of a loss over the result then holds their gradients, and none for the weights.
    /// [`ForwardMode::Fast`] records no graph at all (the teacher's pass).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &UNetConditioning,
        path: ForwardMode,
    ) -> Result<Tensor> {
        let batch = self.check_inputs(sample, timesteps, cond)?;
        if path == ForwardMode::Fast {
            // Some fast kernels record no gradient: a partial graph would give wrong
            // gradients silently, so the fast path records none.
            let (ctx, pooled) = (
                cond.encoder_hidden_states.detach(),
                cond.text_embeds.detach(),
            );
            let cond = UNetConditioning {
                encoder_hidden_states: &ctx,
                text_embeds: &pooled,
                time_ids: cond.time_ids,
            };
            return self.forward_inner(&sample.detach(), timesteps, &cond, path, batch);
        }
        self.forward_inner(sample, timesteps, cond, path, batch)
    }

    fn forward_inner(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &UNetConditioning,
        path: ForwardMode,
        batch: usize,
    ) -> Result<Tensor> {
        let ckpt = self.checkpointing && path == ForwardMode::Differentiable;
        let dt = self.dtype;
        let c0 = self.cfg.block_out_channels[0];
        let (flip, shift) = (self.cfg.flip_sin_to_cos, self.cfg.freq_shift);
        let t = match timesteps.rank() {
            0 => timesteps.broadcast_as(batch)?.contiguous()?,
            _ => timesteps.clone(),
        };
        let emb = self
            .time_embedding
            .forward(&timestep_embedding(&t, c0, flip, shift, dt)?)?;
        let (atd, _) = self.cfg.addition_dims();
        let ids = cond.time_ids.flatten_all()?;
        let time_embeds = timestep_embedding(&ids, atd, flip, shift, dt)?.reshape((batch, ()))?;
        let add = Tensor::cat(&[&cond.text_embeds.to_dtype(dt)?, &time_embeds], 1)?;
        let emb = (emb + self.add_embedding.forward(&add)?)?;
        // Every resnet starts its time branch with SiLU: computed once here.
        let temb = emb.silu()?;
        let context = cond.encoder_hidden_states.to_dtype(dt)?;
        let context = &context;

        let mut h = self.conv_in.forward(&sample.to_dtype(dt)?)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let r = resnet.clone();
                h = checkpointed(
                    ckpt,
                    [&h, &temb],
                    Arc::new(move |[x, t]: &[Tensor; 2]| r.forward(x, t)),
                )?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, path, ckpt)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.resample {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        let (r0, attn, r1) = &self.mid;
        for (i, r) in [r0, r1].into_iter().enumerate() {
            if i == 1 {
                h = attn.forward(&h, context, path, ckpt)?;
            }
            let r = r.clone();
            h = checkpointed(
                ckpt,
                [&h, &temb],
                Arc::new(move |[x, t]: &[Tensor; 2]| r.forward(x, t)),
            )?;
        }

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .expect("one skip per up resnet (by construction)");
                let r = resnet.clone();
                h = checkpointed(
                    ckpt,
                    [&h, &skip, &temb],
                    Arc::new(move |[x, s, t]: &[Tensor; 3]| {
                        r.forward(&Tensor::cat(&[x, s], 1)?, t)
                    }),
                )?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, path, ckpt)?;
                }
            }
            if let Some(conv) = &block.resample {
                // Nearest x2, or to the next skip's size when the latents are not a multiple
                // of 2^upsamplers (diffusers' `upsample_size`).
                let (_, _, th, tw) = skips
                    .last()
                    .expect("a skip below every upsampler")
                    .dims4()?;
                let conv = conv.clone();
                h = checkpointed(
                    ckpt,
                    [&h],
                    Arc::new(move |[x]: &[Tensor; 1]| conv.forward(&upsample_nearest(x, th, tw)?)),
                )?;
            }
        }
        let head = self.head.clone();
        Ok(checkpointed(
            ckpt,
            [&h],
            Arc::new(move |[x]: &[Tensor; 1]| head.conv.forward(&head.norm.forward_silu(x)?)),
        )?)
    }

    /// Checks the inputs' shapes against the config; returns the batch size.
    fn check_inputs(&self, sample: &Tensor, t: &Tensor, cond: &UNetConditioning) -> Result<usize> {
        let bad = |msg: String| Err(Error::Invalid(format!("UNet input: {msg}")));
        let c = &self.cfg;
        let (b, ch, h, w) = match sample.dims() {
            &[b, ch, h, w] => (b, ch, h, w),
            d => {
                return bad(format!(
                    "latents have shape {d:?}, expected [B, {}, H, W]",
                    c.in_channels
                ))
            }
        };
        if ch != c.in_channels || b == 0 || h == 0 || w == 0 {
            return bad(format!(
                "latents have shape {:?}, expected [B, {}, H, W]",
                sample.dims(),
                c.in_channels
            ));
        }
        if !(t.rank() == 0 || t.dims() == [b]) {
            return bad(format!(
                "timesteps have shape {:?}, expected [{b}] (one per sample)",
                t.dims()
            ));
        }
        let ctx = c.context_dim();
        match cond.encoder_hidden_states.dims() {
            &[bb, s, d] if bb == b && d == ctx && s > 0 => {}
            &[_, _, d] if d != ctx => {
                return bad(format!(
                    "encoder_hidden_states have width {d} ({:?}) but this UNet's cross-attention takes {ctx} (cross_attention_dim){}",
                    cond.encoder_hidden_states.dims(),
                    if d == 768 { ": 768 is SD 1.x's CLIP-L alone; SDXL takes CLIP-L and CLIP-G concatenated" } else { "" }
                ))
            }
            d => return bad(format!("encoder_hidden_states have shape {d:?}, expected [{b}, S, {ctx}]")),
        }
        let (atd, proj) = c.addition_dims();
        let (tb, p) = match cond.text_embeds.dims() {
            &[tb, p] => (tb, p),
            d => {
                return bad(format!(
                    "text_embeds have shape {d:?}, expected [{b}, {}]",
                    c.pooled_dim()
                ))
            }
        };
        let (ib, n) = match cond.time_ids.dims() {
            &[ib, n] => (ib, n),
            d => return bad(format!("time_ids have shape {d:?}, expected [{b}, 6]")),
        };
        if tb != b || ib != b || p + n * atd != proj {
            return bad(format!(
                "text_embeds {:?} and time_ids {:?}: expected [{b}, {}] and [{b}, 6] (the add_embedding takes {proj} = pooled width + ids x {atd})",
                cond.text_embeds.dims(),
                cond.time_ids.dims(),
                c.pooled_dim()
            ));
        }
        Ok(b)
    }
}

/// Nearest-neighbour upsampling of `[B, C, H, W]` to `[B, C, th, tw]` as torch computes it
/// (`F.interpolate(mode="nearest")`: source index `floor(i * in / out)` in f32). The
/// factor-2 case (every SDXL-sized input) is a broadcast, whose backward sums each 2x2 block.
fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if th == 2 * h && tw == 2 * w {
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, th, tw));
    }
    let index = |n_in: usize, n_out: usize| -> candle_core::Result<Tensor> {
        let scale = n_in as f32 / n_out as f32;
        let idx: Vec<u32> = (0..n_out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(n_in - 1) as u32)
            .collect();
        Tensor::from_vec(idx, n_out, x.device())
    };
    x.index_select(&index(h, th)?, 2)?
        .index_select(&index(w, tw)?, 3)
}
