//! The UNet's configuration: diffusers' `unet/config.json` (`UNet2DConditionModel`) as it is
//! written, checked to be an SDXL-family UNet this crate computes exactly, and resolved into
//! per-block sizes.
//!
//! Every `config.json` key that changes the computation is either implemented or rejected with
//! a message naming it; keys that only matter to training or to other pipelines
//! (`sample_size`, `dropout`, `_diffusers_version`, ...) are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};

/// A per-block setting: one value for every block, or one per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value of block `i` of `n`.
    fn at(&self, i: usize) -> usize {
        match self {
            Self::One(v) => *v,
            Self::Each(v) => v[i],
        }
    }

    fn len_ok(&self, n: usize) -> bool {
        match self {
            Self::One(_) => true,
            Self::Each(v) => v.len() == n,
        }
    }
}

fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn eps() -> f64 {
    1e-5
}
fn groups() -> Option<usize> {
    Some(32)
}
fn silu() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid() -> Option<String> {
    Some(MID_BLOCK.into())
}

pub const DOWN_PLAIN: &str = "DownBlock2D";
pub const DOWN_CROSS: &str = "CrossAttnDownBlock2D";
pub const UP_PLAIN: &str = "UpBlock2D";
pub const UP_CROSS: &str = "CrossAttnUpBlock2D";
pub const MID_BLOCK: &str = "UNetMidBlock2DCrossAttn";
/// The six size ids SDXL conditions on: original size, crop top-left, target size.
pub const SDXL_TIME_IDS: usize = 6;

/// diffusers' `UNet2DConditionModel` config (the keys of `unet/config.json`), with diffusers'
/// defaults for keys that are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    pub down_block_types: Vec<String>,
    #[serde(default = "mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    #[serde(default = "PerBlock::one")]
    pub transformer_layers_per_block: PerBlock,
    /// The number of attention heads per block (diffusers' historical misnomer; SDXL: [5, 10, 20]).
    pub attention_head_dim: PerBlock,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Softmax in f32 for half-precision models: this crate always computes it in f32 or f64.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Width of the time embedding (`None`: 4 x `block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_str")]
    pub attention_type: String,
    /// Keys whose non-default values this crate does not implement (checked in
    /// [`UNetConfig::validate`]).
    #[serde(flatten, default, skip_serializing_if = "Unsupported::is_default")]
    pub unsupported: Unsupported,
}

/// The `config.json` keys of features SDXL does not use. Each must be absent or at its
/// default (`null`, `false`, `0.0` for dropout is irrelevant and not listed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Unsupported {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_class_embeds: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim_type: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_act_fn: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_post_act: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_norm: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_block_only_cross_attention: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dual_cross_attention: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center_input_sample: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embeddings_concat: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet_skip_time_act: Option<serde_json::Value>,
}

impl Unsupported {
    fn is_default(&self) -> bool {
        self.first_set().is_none()
    }

    /// The first key set to something other than `null`/`false`.
    fn first_set(&self) -> Option<(&'static str, &serde_json::Value)> {
        let keys = [
            ("num_attention_heads", &self.num_attention_heads),
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ),
            ("class_embed_type", &self.class_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("cross_attention_norm", &self.cross_attention_norm),
            ("only_cross_attention", &self.only_cross_attention),
            (
                "mid_block_only_cross_attention",
                &self.mid_block_only_cross_attention,
            ),
            ("dual_cross_attention", &self.dual_cross_attention),
            ("center_input_sample", &self.center_input_sample),
            ("class_embeddings_concat", &self.class_embeddings_concat),
            ("resnet_skip_time_act", &self.resnet_skip_time_act),
        ];
        keys.into_iter().find_map(|(k, v)| match v {
            None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => None,
            Some(v) => Some((k, v)),
        })
    }
}

impl PerBlock {
    fn one() -> Self {
        Self::One(1)
    }
}

/// One down block, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownBlock {
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    /// Transformer blocks per attention (0: a `DownBlock2D`, no attention).
    pub depth: usize,
    pub heads: usize,
    pub downsample: bool,
}

/// One up block, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpBlock {
    /// Channels of the block below (the input of the first resnet, before the skip).
    pub prev_channels: usize,
    pub out_channels: usize,
    /// Channels of the matching down block's input (the last skip's width).
    pub in_channels: usize,
    /// Resnets: the down block's layers + 1.
    pub layers: usize,
    pub depth: usize,
    pub heads: usize,
    pub upsample: bool,
}

impl UNetConfig {
    /// The configuration of SDXL 1.0 base (`stabilityai/stable-diffusion-xl-base-1.0`,
    /// `unet/config.json`).
    pub fn sdxl() -> Self {
        Self {
            class_name: Some("UNet2DConditionModel".into()),
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0,
            down_block_types: vec![DOWN_PLAIN.into(), DOWN_CROSS.into(), DOWN_CROSS.into()],
            mid_block_type: Some(MID_BLOCK.into()),
            up_block_types: vec![UP_CROSS.into(), UP_CROSS.into(), UP_PLAIN.into()],
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: PerBlock::One(2),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            cross_attention_dim: PerBlock::One(2048),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            upcast_attention: None,
            act_fn: "silu".into(),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            resnet_out_scale_factor: 1.0,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_embedding_dim: None,
            time_embedding_type: "positional".into(),
            resnet_time_scale_shift: "default".into(),
            attention_type: "default".into(),
            unsupported: Unsupported::default(),
        }
    }

    /// Reads and checks a diffusers `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path, "UNet config.json")?;
        if let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) {
            if class != "UNet2DConditionModel" {
                return Err(Error::format(
                    path,
                    format!(
                        "`_class_name` is {class}, not UNet2DConditionModel: only SDXL-family UNets are supported{}",
                        family_hint(class)
                    ),
                ));
            }
        }
        let cfg: Self = serde_json::from_value(value).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            what: "UNet config.json",
            source,
        })?;
        cfg.validate().map_err(|msg| Error::format(path, msg))?;
        Ok(cfg)
    }

    /// Writes this config as a diffusers `config.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["_class_name"] = serde_json::json!("UNet2DConditionModel");
        v
    }

    /// Blocks (levels) of the UNet.
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0])
    }

    /// The cross-attention width (every block has the same one; checked by `validate`).
    pub fn context_dim(&self) -> usize {
        self.cross_attention_dim.at(0)
    }

    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)`.
    pub fn addition_dims(&self) -> (usize, usize) {
        (
            self.addition_time_embed_dim.unwrap_or(0),
            self.projection_class_embeddings_input_dim.unwrap_or(0),
        )
    }

    /// Width of the pooled text embedding when SDXL's six size ids are used.
    pub fn pooled_dim(&self) -> usize {
        let (t, p) = self.addition_dims();
        p.saturating_sub(SDXL_TIME_IDS * t)
    }

    /// The down blocks, in order.
    pub fn down_blocks(&self) -> Vec<DownBlock> {
        let n = self.levels();
        let mut out_ch = self.block_out_channels[0];
        (0..n)
            .map(|i| {
                let in_ch = out_ch;
                out_ch = self.block_out_channels[i];
                DownBlock {
                    in_channels: in_ch,
                    out_channels: out_ch,
                    layers: self.layers_per_block.at(i),
                    depth: if self.down_block_types[i] == DOWN_CROSS {
                        self.transformer_layers_per_block.at(i)
                    } else {
                        0
                    },
                    heads: self.attention_head_dim.at(i),
                    downsample: i + 1 < n,
                }
            })
            .collect()
    }

    /// `(transformer depth, heads)` of the mid block's attention.
    pub fn mid_block(&self) -> (usize, usize) {
        let last = self.levels() - 1;
        (
            self.transformer_layers_per_block.at(last),
            self.attention_head_dim.at(last),
        )
    }

    /// The up blocks, in order (deepest first), as diffusers builds them.
    pub fn up_blocks(&self) -> Vec<UpBlock> {
        let n = self.levels();
        let rev = |i: usize| n - 1 - i;
        let mut out_ch = self.block_out_channels[n - 1];
        (0..n)
            .map(|i| {
                let prev = out_ch;
                out_ch = self.block_out_channels[rev(i)];
                UpBlock {
                    prev_channels: prev,
                    out_channels: out_ch,
                    in_channels: self.block_out_channels[rev((i + 1).min(n - 1))],
                    layers: self.layers_per_block.at(rev(i)) + 1,
                    depth: if self.up_block_types[i] == UP_CROSS {
                        self.transformer_layers_per_block.at(rev(i))
                    } else {
                        0
                    },
                    heads: self.attention_head_dim.at(rev(i)),
                    upsample: i + 1 < n,
                }
            })
            .collect()
    }

    /// Checks that this is a UNet whose computation this crate implements exactly; the
    /// message names the offending key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some((key, value)) = self.unsupported.first_set() {
            return Err(format!(
                "`{key}` = {value} is not supported (SDXL leaves it unset)"
            ));
        }
        match self.addition_embed_type.as_deref() {
            Some("text_time") => {}
            other => {
                let ctx = self.cross_attention_dim.at(0);
                return Err(format!(
                    "`addition_embed_type` is {}, not \"text_time\": not an SDXL-family UNet{}",
                    other.map_or("null".to_string(), |o| format!("{o:?}")),
                    match ctx {
                        768 => " (cross-attention width 768 and no add_embedding: an SD 1.x UNet)",
                        1024 =>
                            " (cross-attention width 1024 and no add_embedding: an SD 2.x UNet)",
                        _ => "",
                    }
                ));
            }
        }
        let n = self.levels();
        if n < 2 {
            return Err(format!(
                "`block_out_channels` has {n} entries; need at least 2"
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for (key, v) in [
            ("layers_per_block", &self.layers_per_block),
            (
                "transformer_layers_per_block",
                &self.transformer_layers_per_block,
            ),
            ("attention_head_dim", &self.attention_head_dim),
            ("cross_attention_dim", &self.cross_attention_dim),
        ] {
            if !v.len_ok(n) {
                return Err(format!("`{key}` must be one number or {n} numbers"));
            }
        }
        if (0..n).any(|i| self.cross_attention_dim.at(i) != self.context_dim()) {
            return Err("`cross_attention_dim` differs between blocks: not supported".into());
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != DOWN_PLAIN && t != DOWN_CROSS {
                return Err(format!(
                    "down block {i} is a {t}: only {DOWN_PLAIN} and {DOWN_CROSS} are supported"
                ));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != UP_PLAIN && t != UP_CROSS {
                return Err(format!(
                    "up block {i} is a {t}: only {UP_PLAIN} and {UP_CROSS} are supported"
                ));
            }
            let down = &self.down_block_types[n - 1 - i];
            if (t == UP_CROSS) != (down == DOWN_CROSS) {
                return Err(format!(
                    "up block {i} ({t}) does not mirror down block {} ({down})",
                    n - 1 - i
                ));
            }
        }
        if self.mid_block_type.as_deref() != Some(MID_BLOCK) {
            return Err(format!(
                "`mid_block_type` is {:?}: only {MID_BLOCK} is supported",
                self.mid_block_type
            ));
        }
        let checks = [
            ("act_fn", self.act_fn == "silu", "\"silu\""),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                "\"positional\"",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                "\"default\"",
            ),
            (
                "attention_type",
                self.attention_type == "default",
                "\"default\"",
            ),
            ("conv_in_kernel", self.conv_in_kernel % 2 == 1, "odd"),
            ("conv_out_kernel", self.conv_out_kernel % 2 == 1, "odd"),
            ("norm_num_groups", self.norm_num_groups.is_some(), "set"),
        ];
        if let Some((key, _, want)) = checks.iter().find(|c| !c.1) {
            return Err(format!("`{key}` must be {want} (as in SDXL)"));
        }
        let (atd, proj) = self.addition_dims();
        if atd == 0 || proj <= SDXL_TIME_IDS * atd {
            return Err(format!(
                "`projection_class_embeddings_input_dim` ({proj}) must exceed 6 x `addition_time_embed_dim` ({atd}): the pooled text embedding plus six size ids"
            ));
        }
        if !self.block_out_channels[0].is_multiple_of(2) || !atd.is_multiple_of(2) {
            return Err("sinusoidal embedding widths (`block_out_channels[0]`, `addition_time_embed_dim`) must be even".into());
        }
        let g = self.groups();
        let mut widths: Vec<usize> = self.block_out_channels.clone();
        for u in self.up_blocks() {
            widths.push(u.prev_channels + u.out_channels);
            widths.push(u.out_channels + u.in_channels);
            widths.push(2 * u.out_channels);
        }
        if let Some(w) = widths.iter().find(|&&w| g == 0 || !w.is_multiple_of(g)) {
            return Err(format!(
                "`norm_num_groups` ({g}) does not divide a block's channels ({w})"
            ));
        }
        for (i, d) in self.down_blocks().iter().enumerate() {
            if d.layers == 0 {
                return Err(format!("`layers_per_block` of block {i} is 0"));
            }
            if d.depth > 0 && (d.heads == 0 || !d.out_channels.is_multiple_of(d.heads)) {
                return Err(format!(
                    "block {i}: {} channels do not split into {} attention heads (`attention_head_dim`)",
                    d.out_channels, d.heads
                ));
            }
        }
        let (mid_depth, mid_heads) = self.mid_block();
        if mid_depth == 0
            || mid_heads == 0
            || !self.block_out_channels[n - 1].is_multiple_of(mid_heads)
        {
            return Err("the mid block's attention needs at least one layer and heads that divide its channels".into());
        }
        Ok(())
    }
}

/// A hint naming the model family of a diffusers class name that is not an SDXL UNet.
pub(crate) fn family_hint(class: &str) -> &'static str {
    match class {
        "SD3Transformer2DModel" => " (an SD3 MMDiT transformer)",
        "FluxTransformer2DModel" => " (a Flux transformer)",
        "UNet2DModel" => " (an unconditional UNet)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_resolves_to_its_known_blocks() {
        let c = UNetConfig::sdxl();
        c.validate().unwrap();
        let down = c.down_blocks();
        assert_eq!(down[0].depth, 0);
        assert_eq!(
            (down[2].depth, down[2].heads, down[2].downsample),
            (10, 20, false)
        );
        let up = c.up_blocks();
        assert_eq!(
            (
                up[0].prev_channels,
                up[0].out_channels,
                up[0].in_channels,
                up[0].layers
            ),
            (1280, 1280, 640, 3)
        );
        assert_eq!(
            (up[2].prev_channels, up[2].in_channels, up[2].depth),
            (640, 320, 0)
        );
        assert_eq!((c.time_embed_dim(), c.pooled_dim()), (1280, 1280));
    }

    #[test]
    fn round_trips_through_json() {
        let c = UNetConfig::sdxl();
        let back: UNetConfig = serde_json::from_value(c.to_json()).unwrap();
        assert_eq!(back, c);
    }
}
