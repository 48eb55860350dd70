//! CLIP text transformer, matching Hugging Face `transformers` 4.57 `CLIPTextModel` (CLIP-L)
//! and `CLIPTextModelWithProjection` (CLIP-G) in `models/clip/modeling_clip.py`, for
//! inference only (fast kernels, no padding mask: SDXL runs both encoders on full 77-token
//! rows with the causal mask alone, as diffusers does).
//!
//! Unlike candle-transformers' `stable_diffusion::clip`: exact erf GELU where the config says
//! `gelu`, the end-token pooling rule of `transformers`, `text_projection`, and it stops after
//! the penultimate layer when only `hidden_states[-2]` is needed (CLIP-L in SDXL).
//!
//! Each block pulls its weights by [`Param`] (see [`super::schema`] for the names); a
//! `checkpoint::Source` reads them from the file actually opened (a diffusers folder, or a
//! single-file SDXL checkpoint in open_clip layout).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::Source;
use super::schema::{LayerModule, Param};
use crate::error::{read_json, Error, Result};
use crate::ops::{self, ForwardMode, MASKED};

/// `hidden_act` of a CLIP text config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP, SDXL's CLIP-L).
    QuickGelu,
    /// `gelu`: exact erf GELU (open_clip ViT-bigG, SDXL's CLIP-G).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: tanh approximation.
    GeluTanh,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => ops::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// Where the pooled vector is read, exactly as `CLIPTextTransformer.forward` in
/// `transformers` 4.57 decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// `eos_token_id == 2` (configs written before transformers PR #24773, which includes
    /// SDXL's own `text_encoder*/config.json`): the position of the largest id in the row
    /// (`input_ids.argmax(-1)`, first one on ties). With CLIP's vocabulary the end token 49407
    /// is the largest id, so this is the first end token of a tokenized prompt.
    ArgmaxId,
    /// Any other `eos_token_id`: the first position holding it (`(ids == eos).argmax(-1)`),
    /// so position 0 if the row has none.
    FirstToken(u32),
}

impl Pooling {
    pub fn from_eos_token_id(eos: u32) -> Self {
        if eos == 2 {
            Self::ArgmaxId
        } else {
            Self::FirstToken(eos)
        }
    }

    /// Pooled position of one row of ids.
    pub fn position(self, row: &[u32]) -> usize {
        let mut best = 0;
        match self {
            Self::ArgmaxId => {
                for (i, &id) in row.iter().enumerate() {
                    if id > row[best] {
                        best = i;
                    }
                }
            }
            Self::FirstToken(eos) => {
                if let Some(i) = row.iter().position(|&id| id == eos) {
                    best = i;
                }
            }
        }
        best
    }
}

/// The fields of a Hugging Face `CLIPTextConfig` (`config.json`) that shape the computation.
/// Missing optional fields take `transformers`' defaults; the four size fields are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_vocab() -> usize {
    49408
}
fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    // `CLIPTextConfig.__init__` default in transformers 4.57.
    49407
}

impl ClipTextConfig {
    /// Reads a `config.json`; a combined `CLIPConfig` (with `text_config`) is accepted too.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::format(path, "config.json not found"));
        }
        let v: serde_json::Value = read_json(path, "CLIP text config.json")?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        let cfg: Self = serde_json::from_value(v).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            what: "CLIP text config.json",
            source,
        })?;
        cfg.validate().map_err(|msg| Error::format(path, msg))?;
        Ok(cfg)
    }

    pub fn activation(&self) -> std::result::Result<Activation, String> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            format!(
                "hidden_act \"{}\" is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)",
                self.hidden_act
            )
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        self.activation()?;
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(format!(
                "layer_norm_eps must be positive (got {})",
                self.layer_norm_eps
            ));
        }
        if self.projection_dim == Some(0) {
            return Err("projection_dim must be at least 1".into());
        }
        Ok(())
    }
}

/// What a caller needs from an encoder: SDXL takes `hidden_states[-2]` from both and the
/// projected pooled vector from CLIP-G only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Penultimate hidden states only: the last layer, final norm and projection are not
    /// loaded (CLIP-L in SDXL).
    Penultimate,
    /// Penultimate hidden states and the pooled, projected vector (CLIP-G in SDXL).
    PenultimateAndPooled,
}

/// `nn.Linear` with bias, `[out, in]` weight.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(src: &Source, [weight, bias]: [Param; 2]) -> Result<Self> {
        Ok(Self {
            weight: src.get(weight)?,
            bias: src.get(bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::matmul_t(x, &self.weight)?.broadcast_add(&self.bias)
    }
}

/// `nn.LayerNorm` with affine weight and bias.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(src: &Source, [weight, bias]: [Param; 2]) -> Result<Self> {
        Ok(Self {
            weight: src.get(weight)?,
            bias: src.get(bias)?,
            eps: src.config().layer_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps, ForwardMode::Fast)
    }
}

/// `CLIPTextEmbeddings`: token + absolute position embeddings.
struct Embeddings {
    token_embedding: Tensor,
    position_embedding: Tensor,
}

impl Embeddings {
    fn load(src: &Source) -> Result<Self> {
        Ok(Self {
            token_embedding: src.get(Param::TokenEmbedding)?,
            position_embedding: src.get(Param::PositionEmbedding)?,
        })
    }

    /// `ids`: `[B,T]` u32 -> `[B,T,H]`; positions are `0..T`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.token_embedding.dim(1)?;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        tok.broadcast_add(&self.position_embedding.narrow(0, 0, t)?)
    }
}

/// `CLIPAttention`: multi-head self-attention with biased q/k/v/out projections; the scale
/// `head_dim^-0.5` is applied to the scores, as `transformers` does.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(src: &Source, layer: usize) -> Result<Self> {
        let cfg = src.config();
        let linear = |m| Linear::load(src, Param::module(layer, m));
        Ok(Self {
            q_proj: linear(LayerModule::QProj)?,
            k_proj: linear(LayerModule::KProj)?,
            v_proj: linear(LayerModule::VProj)?,
            out_proj: linear(LayerModule::OutProj)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: `[B,T,H]`; `causal`: `[T,T]` additive f32 mask.
    fn forward(&self, x: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (nh, hd) = (self.heads, self.head_dim);
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        // The LLM's attention op (fused on the CPU): same scale, causal bias per prompt.
        let bias = causal.broadcast_as((b, 1, 1, t, t))?.contiguous()?;
        let out = ops::attention(&q, &k, &v, &bias, ForwardMode::Fast)?;
        debug_assert_eq!(out.dims(), [b, t, h]);
        self.out_proj.forward(&out)
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn load(src: &Source, layer: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(src, Param::module(layer, LayerModule::Fc1))?,
            fc2: Linear::load(src, Param::module(layer, LayerModule::Fc2))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-LN attention and MLP, each with a residual.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn load(src: &Source, layer: usize, act: Activation) -> Result<Self> {
        let norm = |m| LayerNorm::load(src, Param::module(layer, m));
        Ok(Self {
            layer_norm1: norm(LayerModule::LayerNorm1)?,
            self_attn: Attention::load(src, layer)?,
            layer_norm2: norm(LayerModule::LayerNorm2)?,
            mlp: Mlp::load(src, layer, act)?,
        })
    }

    fn forward(&self, x: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, causal)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + h
    }
}

/// What one encoder returns for a batch of ids.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[-2]`: output of the layer before last, no final norm. `[B,T,H]`.
    pub penultimate: Tensor,
    /// `text_projection(final_layer_norm(last layer)[pooled position])`, `[B,P]`; only for
    /// [`Role::PenultimateAndPooled`].
    pub pooled: Option<Tensor>,
    /// The pooled position of each row (see [`Pooling`]).
    pub pooled_positions: Vec<usize>,
}

/// One CLIP text encoder. `layers` holds `num_hidden_layers - 1` layers for
/// [`Role::Penultimate`] (the last one is never needed) and all of them otherwise.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    act: Activation,
    pooling: Pooling,
    role: Role,
    /// The file or folder the weights came from (named in errors).
    origin: PathBuf,
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    /// `text_projection.weight` `[P,H]` (no bias).
    text_projection: Option<Tensor>,
}

impl ClipTextModel {
    /// Loads the weights `role` needs through `src` (for `src`'s config). `pooling` is given by
    /// the caller: from `eos_token_id` for a config, inferred for a single-file checkpoint.
    pub(crate) fn load(pooling: Pooling, role: Role, src: &Source) -> Result<Self> {
        let cfg = src.config().clone();
        let act = cfg
            .activation()
            .map_err(|msg| Error::format(src.origin(), msg))?;
        let n = match role {
            Role::Penultimate => cfg.num_hidden_layers - 1,
            Role::PenultimateAndPooled => cfg.num_hidden_layers,
        };
        let embeddings = Embeddings::load(src)?;
        let layers = (0..n)
            .map(|i| EncoderLayer::load(src, i, act))
            .collect::<Result<Vec<_>>>()?;
        let (final_layer_norm, text_projection) = match role {
            Role::Penultimate => (None, None),
            Role::PenultimateAndPooled => {
                if cfg.projection_dim.is_none() {
                    return Err(Error::format(
                        src.origin(),
                        "no projection_dim: CLIP-G needs text_projection",
                    ));
                }
                (
                    Some(LayerNorm::load(src, Param::final_norm())?),
                    Some(src.get(Param::Projection)?),
                )
            }
        };
        Ok(Self {
            cfg,
            act,
            pooling,
            role,
            origin: src.origin().to_path_buf(),
            embeddings,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    pub fn activation(&self) -> Activation {
        self.act
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// `P` of the pooled output, if this encoder produces one.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection.as_ref().map(|w| w.dims()[0])
    }

    pub fn device(&self) -> &Device {
        self.embeddings.token_embedding.device()
    }

    pub fn dtype(&self) -> DType {
        self.embeddings.token_embedding.dtype()
    }

    /// Runs `ids` (`[B,T]`, any integer dtype, `T <= max_position_embeddings`) through the
    /// encoder with the causal mask only. Outputs are in the model dtype.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = ids.dims2()?;
        if t == 0 || t > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{}: sequences of {t} tokens do not fit (1..={} positions)",
                self.origin.display(),
                self.cfg.max_position_embeddings
            )));
        }
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} ({vocab} entries): the tokenizer does not belong to this text encoder",
                self.origin.display()
            )));
        }
        let ids = Tensor::from_vec(rows.concat(), (b, t), self.device())?;
        let causal = causal_mask(t, self.device())?;
        let penult_layers = self.cfg.num_hidden_layers - 1;
        let mut x = self.embeddings.forward(&ids)?;
        for layer in &self.layers[..penult_layers] {
            x = layer.forward(&x, &causal)?;
        }
        let penultimate = x.clone();
        let positions: Vec<usize> = rows.iter().map(|r| self.pooling.position(r)).collect();
        let pooled = match (&self.final_layer_norm, &self.text_projection) {
            (Some(norm), Some(proj)) => {
                for layer in &self.layers[penult_layers..] {
                    x = layer.forward(&x, &causal)?;
                }
                let h = x.dim(2)?;
                let flat_idx: Vec<u32> = positions
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| (i * t + p) as u32)
                    .collect();
                let idx = Tensor::from_vec(flat_idx, b, x.device())?;
                let rows = x.reshape((b * t, h))?.index_select(&idx, 0)?;
                Some(ops::matmul_t(&norm.forward(&rows)?, proj)?)
            }
            _ => None,
        };
        Ok(ClipTextOutput {
            penultimate,
            pooled,
            pooled_positions: positions,
        })
    }
}

/// `[T,T]` additive causal mask in f32: 0 on and below the diagonal, [`MASKED`] above.
fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASKED as f32 } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_rules_follow_transformers() {
        // eos_token_id == 2: argmax of the ids, first one on ties.
        let p = Pooling::from_eos_token_id(2);
        assert_eq!(p, Pooling::ArgmaxId);
        assert_eq!(p.position(&[49406, 320, 49407, 49407]), 2);
        assert_eq!(p.position(&[49406, 320, 49407, 0, 0]), 2);
        assert_eq!(p.position(&[5, 9, 1, 9]), 1);
        // Any other id: its first occurrence, 0 when absent.
        let p = Pooling::from_eos_token_id(49407);
        assert_eq!(p, Pooling::FirstToken(49407));
        assert_eq!(p.position(&[49406, 320, 49407, 49407]), 2);
        assert_eq!(p.position(&[5, 9, 1, 9]), 0);
    }

    #[test]
    fn activations_by_name() {
        assert_eq!(Activation::parse("quick_gelu"), Some(Activation::QuickGelu));
        assert_eq!(Activation::parse("gelu"), Some(Activation::Gelu));
        assert_eq!(Activation::parse("relu"), None);
    }
}
