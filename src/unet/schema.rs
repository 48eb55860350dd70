//! Every tensor of the UNet in one table, named in both layouts SDXL ships:
//! diffusers' `UNet2DConditionModel` (`down_blocks.1.attentions.0...`) and the original
//! LDM/SGM `UNetModel` of single-file checkpoints (`input_blocks.4.1...`, without the
//! `model.diffusion_model.` prefix). [`Layout`] walks the architecture once for a config and
//! gives each module its place in both layouts and its sizes; the model builds itself from
//! it, [`Layout::tensors`] flattens it into the name table that loading, the single-file
//! reader and the generator read.
//!
//! The two layouts differ only in where modules sit (the mapping of diffusers'
//! `convert_ldm_unet_checkpoint`) and in the resnets' inner names ([`RESNET`]); the
//! transformers' inner names are the same in both.

use super::config::UNetConfig;

/// A module's name in both layouts (no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub diffusers: String,
    pub ldm: String,
}

impl Site {
    fn new(diffusers: impl Into<String>, ldm: impl Into<String>) -> Self {
        Self {
            diffusers: diffusers.into(),
            ldm: ldm.into(),
        }
    }

    /// A module inside this one, named `diffusers` / `ldm` relative to it.
    fn child(&self, diffusers: &str, ldm: &str) -> Self {
        Self::new(
            format!("{}.{diffusers}", self.diffusers),
            format!("{}.{ldm}", self.ldm),
        )
    }

    /// A tensor of this module: `(diffusers name, LDM name, shape)`.
    fn tensor(&self, field: &str, shape: Vec<usize>) -> TensorSpec {
        TensorSpec {
            name: format!("{}.{field}", self.diffusers),
            ldm: format!("{}.{field}", self.ldm),
            shape,
        }
    }
}

/// One tensor: its diffusers name, its LDM name, and its shape (the same in both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub ldm: String,
    pub shape: Vec<usize>,
}

/// A resnet's inner modules: diffusers name, LDM name (`ResBlock`'s `nn.Sequential` indices).
pub const RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// The site of a resnet's inner module `name` (a diffusers name from [`RESNET`]).
fn resnet_part(site: &Site, name: &str) -> Site {
    let (_, ldm) = RESNET
        .iter()
        .find(|(d, _)| *d == name)
        .expect("a resnet module listed in RESNET");
    site.child(name, ldm)
}

/// A linear layer `[out, in]` with a bias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    pub site: Site,
    pub inp: usize,
    pub out: usize,
}

/// A convolution `[out, in, k, k]` with a bias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    pub site: Site,
    pub inp: usize,
    pub out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// A group norm over `channels`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormSpec {
    pub site: Site,
    pub channels: usize,
    pub groups: usize,
    pub eps: f64,
}

/// diffusers' `ResnetBlock2D` (LDM `ResBlock`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResnetSpec {
    pub norm1: NormSpec,
    pub conv1: ConvSpec,
    pub time_emb_proj: LinearSpec,
    pub norm2: NormSpec,
    pub conv2: ConvSpec,
    /// A 1x1 convolution when the channels change.
    pub conv_shortcut: Option<ConvSpec>,
    pub output_scale_factor: f64,
}

/// diffusers' `Transformer2DModel` (LDM `SpatialTransformer`): same inner names in both.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSpec {
    pub site: Site,
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    /// `proj_in`/`proj_out` are linears (`[C, C]`), else 1x1 convolutions (`[C, C, 1, 1]`).
    pub linear_projection: bool,
    pub groups: usize,
}

/// Layer norms of the transformer blocks (diffusers' default, not configurable).
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// The transformer's input group norm (hard-coded in diffusers' `Transformer2DModel`).
pub const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;

impl TransformerSpec {
    /// The site of transformer block `i`.
    pub fn block(&self, i: usize) -> Site {
        self.site.child(
            &format!("transformer_blocks.{i}"),
            &format!("transformer_blocks.{i}"),
        )
    }

    /// Inner width of the GEGLU feed-forward.
    pub fn ff_inner(&self) -> usize {
        4 * self.channels
    }

    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        let c = self.channels;
        let s = &self.site;
        out.push(s.tensor("norm.weight", vec![c]));
        out.push(s.tensor("norm.bias", vec![c]));
        let proj = if self.linear_projection {
            vec![c, c]
        } else {
            vec![c, c, 1, 1]
        };
        out.push(s.tensor("proj_in.weight", proj.clone()));
        out.push(s.tensor("proj_in.bias", vec![c]));
        for i in 0..self.depth {
            let b = self.block(i);
            for n in ["norm1", "norm2", "norm3"] {
                out.push(b.tensor(&format!("{n}.weight"), vec![c]));
                out.push(b.tensor(&format!("{n}.bias"), vec![c]));
            }
            for (attn, kv) in [("attn1", c), ("attn2", self.context_dim)] {
                out.push(b.tensor(&format!("{attn}.to_q.weight"), vec![c, c]));
                out.push(b.tensor(&format!("{attn}.to_k.weight"), vec![c, kv]));
                out.push(b.tensor(&format!("{attn}.to_v.weight"), vec![c, kv]));
                out.push(b.tensor(&format!("{attn}.to_out.0.weight"), vec![c, c]));
                out.push(b.tensor(&format!("{attn}.to_out.0.bias"), vec![c]));
            }
            let inner = self.ff_inner();
            out.push(b.tensor("ff.net.0.proj.weight", vec![2 * inner, c]));
            out.push(b.tensor("ff.net.0.proj.bias", vec![2 * inner]));
            out.push(b.tensor("ff.net.2.weight", vec![c, inner]));
            out.push(b.tensor("ff.net.2.bias", vec![c]));
        }
        out.push(s.tensor("proj_out.weight", proj));
        out.push(s.tensor("proj_out.bias", vec![c]));
    }
}

/// One down or up block: its resnets, their attentions (none in a plain block) and the
/// resampling convolution after them.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub resnets: Vec<ResnetSpec>,
    pub attentions: Vec<TransformerSpec>,
    /// `Downsample2D` (stride 2) after a down block, `Upsample2D` (nearest x2, then this)
    /// after an up block.
    pub resample: Option<ConvSpec>,
}

/// The mid block: resnet, transformer, resnet.
#[derive(Debug, Clone, PartialEq)]
pub struct MidSpec {
    pub resnets: [ResnetSpec; 2],
    pub attention: TransformerSpec,
}

/// The whole UNet for one config.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub time_linear_1: LinearSpec,
    pub time_linear_2: LinearSpec,
    pub add_linear_1: LinearSpec,
    pub add_linear_2: LinearSpec,
    pub conv_in: ConvSpec,
    pub down: Vec<BlockSpec>,
    pub mid: MidSpec,
    pub up: Vec<BlockSpec>,
    pub norm_out: NormSpec,
    pub conv_out: ConvSpec,
}

/// Sizes shared by every resnet.
struct Common {
    groups: usize,
    eps: f64,
    temb: usize,
    context: usize,
    linear_projection: bool,
}

impl Common {
    fn norm(&self, site: Site, channels: usize, eps: f64) -> NormSpec {
        NormSpec {
            site,
            channels,
            groups: self.groups,
            eps,
        }
    }

    fn resnet(&self, site: Site, inp: usize, out: usize, scale: f64) -> ResnetSpec {
        let conv = |name: &str, i: usize, k: usize| ConvSpec {
            site: resnet_part(&site, name),
            inp: i,
            out,
            kernel: k,
            stride: 1,
            padding: k / 2,
        };
        ResnetSpec {
            norm1: self.norm(resnet_part(&site, "norm1"), inp, self.eps),
            conv1: conv("conv1", inp, 3),
            time_emb_proj: LinearSpec {
                site: resnet_part(&site, "time_emb_proj"),
                inp: self.temb,
                out,
            },
            norm2: self.norm(resnet_part(&site, "norm2"), out, self.eps),
            conv2: conv("conv2", out, 3),
            conv_shortcut: (inp != out).then(|| conv("conv_shortcut", inp, 1)),
            output_scale_factor: scale,
        }
    }

    fn transformer(
        &self,
        site: Site,
        channels: usize,
        heads: usize,
        depth: usize,
    ) -> TransformerSpec {
        TransformerSpec {
            site,
            channels,
            heads,
            depth,
            context_dim: self.context,
            linear_projection: self.linear_projection,
            groups: self.groups,
        }
    }
}

impl Layout {
    /// Walks the architecture of `cfg` (validated) as diffusers builds it, naming every module
    /// as diffusers' `convert_ldm_unet_checkpoint` maps it.
    pub fn new(cfg: &UNetConfig) -> Self {
        let c0 = cfg.block_out_channels[0];
        let temb = cfg.time_embed_dim();
        let common = Common {
            groups: cfg.groups(),
            eps: cfg.norm_eps,
            temb,
            context: cfg.context_dim(),
            linear_projection: cfg.use_linear_projection,
        };
        let (_, proj) = cfg.addition_dims();
        let linear = |d: &str, l: &str, inp, out| LinearSpec {
            site: Site::new(d, l),
            inp,
            out,
        };
        let conv = |d: &str, l: &str, inp, out, kernel| ConvSpec {
            site: Site::new(d, l),
            inp,
            out,
            kernel,
            stride: 1,
            padding: kernel / 2,
        };
        // LDM numbers the down path's modules in one list: conv_in, then per block its
        // (resnet, attention) pairs and its downsampler.
        let mut input_block = 1;
        let down = cfg
            .down_blocks()
            .iter()
            .enumerate()
            .map(|(b, d)| {
                let mut block = BlockSpec {
                    resnets: vec![],
                    attentions: vec![],
                    resample: None,
                };
                for j in 0..d.layers {
                    let ldm = format!("input_blocks.{input_block}");
                    let inp = if j == 0 {
                        d.in_channels
                    } else {
                        d.out_channels
                    };
                    block.resnets.push(common.resnet(
                        Site::new(format!("down_blocks.{b}.resnets.{j}"), format!("{ldm}.0")),
                        inp,
                        d.out_channels,
                        cfg.resnet_out_scale_factor,
                    ));
                    if d.depth > 0 {
                        block.attentions.push(common.transformer(
                            Site::new(
                                format!("down_blocks.{b}.attentions.{j}"),
                                format!("{ldm}.1"),
                            ),
                            d.out_channels,
                            d.heads,
                            d.depth,
                        ));
                    }
                    input_block += 1;
                }
                if d.downsample {
                    block.resample = Some(ConvSpec {
                        site: Site::new(
                            format!("down_blocks.{b}.downsamplers.0.conv"),
                            format!("input_blocks.{input_block}.0.op"),
                        ),
                        inp: d.out_channels,
                        out: d.out_channels,
                        kernel: 3,
                        stride: 2,
                        padding: cfg.downsample_padding,
                    });
                    input_block += 1;
                }
                block
            })
            .collect();
        let last = *cfg
            .block_out_channels
            .last()
            .expect("validated: >= 2 blocks");
        let (mid_depth, mid_heads) = cfg.mid_block();
        let mid_resnet = |i: usize, ldm: usize| {
            common.resnet(
                Site::new(
                    format!("mid_block.resnets.{i}"),
                    format!("middle_block.{ldm}"),
                ),
                last,
                last,
                cfg.mid_block_scale_factor,
            )
        };
        let mid = MidSpec {
            resnets: [mid_resnet(0, 0), mid_resnet(1, 2)],
            attention: common.transformer(
                Site::new("mid_block.attentions.0", "middle_block.1"),
                last,
                mid_heads,
                mid_depth,
            ),
        };
        let mut output_block = 0;
        let up = cfg
            .up_blocks()
            .iter()
            .enumerate()
            .map(|(b, u)| {
                let mut block = BlockSpec {
                    resnets: vec![],
                    attentions: vec![],
                    resample: None,
                };
                for j in 0..u.layers {
                    let ldm = format!("output_blocks.{output_block}");
                    let inp = if j == 0 {
                        u.prev_channels
                    } else {
                        u.out_channels
                    };
                    let skip = if j + 1 == u.layers {
                        u.in_channels
                    } else {
                        u.out_channels
                    };
                    block.resnets.push(common.resnet(
                        Site::new(format!("up_blocks.{b}.resnets.{j}"), format!("{ldm}.0")),
                        inp + skip,
                        u.out_channels,
                        cfg.resnet_out_scale_factor,
                    ));
                    if u.depth > 0 {
                        block.attentions.push(common.transformer(
                            Site::new(format!("up_blocks.{b}.attentions.{j}"), format!("{ldm}.1")),
                            u.out_channels,
                            u.heads,
                            u.depth,
                        ));
                    }
                    if j + 1 == u.layers && u.upsample {
                        // After the resnet (.0) and the attention (.1) when there is one.
                        let slot = if u.depth > 0 { 2 } else { 1 };
                        block.resample = Some(conv(
                            &format!("up_blocks.{b}.upsamplers.0.conv"),
                            &format!("{ldm}.{slot}.conv"),
                            u.out_channels,
                            u.out_channels,
                            3,
                        ));
                    }
                    output_block += 1;
                }
                block
            })
            .collect();
        Self {
            time_linear_1: linear("time_embedding.linear_1", "time_embed.0", c0, temb),
            time_linear_2: linear("time_embedding.linear_2", "time_embed.2", temb, temb),
            add_linear_1: linear("add_embedding.linear_1", "label_emb.0.0", proj, temb),
            add_linear_2: linear("add_embedding.linear_2", "label_emb.0.2", temb, temb),
            conv_in: conv(
                "conv_in",
                "input_blocks.0.0",
                cfg.in_channels,
                c0,
                cfg.conv_in_kernel,
            ),
            down,
            mid,
            up,
            norm_out: common.norm(Site::new("conv_norm_out", "out.0"), c0, cfg.norm_eps),
            conv_out: conv(
                "conv_out",
                "out.2",
                c0,
                cfg.out_channels,
                cfg.conv_out_kernel,
            ),
        }
    }

    /// Every tensor, in diffusers' module order.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        for l in [&self.time_linear_1, &self.time_linear_2] {
            l.tensors(&mut out);
        }
        for l in [&self.add_linear_1, &self.add_linear_2] {
            l.tensors(&mut out);
        }
        self.conv_in.tensors(&mut out);
        for b in &self.down {
            b.tensors(&mut out);
        }
        for b in &self.up {
            b.tensors(&mut out);
        }
        self.mid.attention.tensors(&mut out);
        for r in &self.mid.resnets {
            r.tensors(&mut out);
        }
        self.norm_out.tensors(&mut out);
        self.conv_out.tensors(&mut out);
        out
    }
}

impl LinearSpec {
    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        out.push(self.site.tensor("weight", vec![self.out, self.inp]));
        out.push(self.site.tensor("bias", vec![self.out]));
    }
}

impl ConvSpec {
    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        let k = self.kernel;
        out.push(self.site.tensor("weight", vec![self.out, self.inp, k, k]));
        out.push(self.site.tensor("bias", vec![self.out]));
    }
}

impl NormSpec {
    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        out.push(self.site.tensor("weight", vec![self.channels]));
        out.push(self.site.tensor("bias", vec![self.channels]));
    }
}

impl ResnetSpec {
    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        self.norm1.tensors(out);
        self.conv1.tensors(out);
        self.time_emb_proj.tensors(out);
        self.norm2.tensors(out);
        self.conv2.tensors(out);
        if let Some(s) = &self.conv_shortcut {
            s.tensors(out);
        }
    }
}

impl BlockSpec {
    fn tensors(&self, out: &mut Vec<TensorSpec>) {
        for a in &self.attentions {
            a.tensors(out);
        }
        for r in &self.resnets {
            r.tensors(out);
        }
        if let Some(c) = &self.resample {
            c.tensors(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(t: &'a [TensorSpec], name: &str) -> &'a TensorSpec {
        t.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn sdxl_names_match_diffusers_conversion() {
        let t = Layout::new(&UNetConfig::sdxl()).tensors();
        // diffusers' SDXL UNet has 1680 tensors.
        assert_eq!(t.len(), 1680);
        let total: usize = t.iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert_eq!(total, 2_567_463_684);
        let cases = [
            (
                "down_blocks.0.resnets.1.conv1.weight",
                "input_blocks.2.0.in_layers.2.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.bias",
                "middle_block.2.emb_layers.1.bias",
            ),
            (
                "mid_block.attentions.0.proj_out.weight",
                "middle_block.1.proj_out.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.1.attentions.2.norm.bias",
                "output_blocks.5.1.norm.bias",
            ),
            (
                "up_blocks.2.resnets.2.norm2.weight",
                "output_blocks.8.0.out_layers.0.weight",
            ),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (d, l) in cases {
            assert_eq!(find(&t, d).ldm, l);
        }
        assert_eq!(
            find(&t, "add_embedding.linear_1.weight").shape,
            [1280, 2816]
        );
        assert_eq!(
            find(&t, "up_blocks.0.resnets.2.conv1.weight").shape,
            [1280, 1920, 3, 3]
        );
        assert!(!t.iter().any(|s| s.ldm.starts_with("output_blocks.8.1")));
    }
}
