//! Perceiver Resampler: LLM hidden states `[B,T,H]` -> SDXL `prompt_embeds` `[B,77,2048]` and
//! `pooled_prompt_embeds` `[B,1280]`. Architecture and tensor names are documented in
//! `docs/adapter-format.md`; `tests/reference/resampler.py` is the PyTorch twin it is tested
//! against.

pub mod pth;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::save_atomic;
use crate::ops::{self, ForwardMode, MASKED};
use crate::rng::Rng;

/// Safetensors metadata key that carries the config next to the weights.
pub const CONFIG_METADATA_KEY: &str = "qwenclip.resampler";

/// Upper bounds of a resampler's sizes: far above any real one (SDXL's is 2048 wide with 4
/// layers) and low enough that no shape or parameter count overflows. A config beyond them
/// comes from a damaged or foreign file, and building it would ask for terabytes.
const MAX_SIZE: usize = 1 << 14;
const MAX_FF_MULT: usize = 64;
const MAX_LAYERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResamplerConfig {
    pub input_dim: usize,
    #[serde(default = "d_width")]
    pub width: usize,
    #[serde(default = "d_heads")]
    pub heads: usize,
    #[serde(default = "d_ff_mult")]
    pub ff_mult: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
    #[serde(default = "d_latents")]
    pub num_latents: usize,
    #[serde(default = "d_output")]
    pub output_dim: usize,
    #[serde(default = "d_pooled")]
    pub pooled_dim: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
}

fn d_width() -> usize {
    2048
}
fn d_heads() -> usize {
    16
}
fn d_ff_mult() -> usize {
    4
}
fn d_layers() -> usize {
    4
}
fn d_latents() -> usize {
    77
}
fn d_output() -> usize {
    2048
}
fn d_pooled() -> usize {
    1280
}
fn d_eps() -> f64 {
    1e-5
}

impl ResamplerConfig {
    /// The default SDXL resampler for an LLM of width `input_dim`.
    pub fn for_input(input_dim: usize) -> Self {
        Self {
            input_dim,
            width: d_width(),
            heads: d_heads(),
            ff_mult: d_ff_mult(),
            layers: d_layers(),
            num_latents: d_latents(),
            output_dim: d_output(),
            pooled_dim: d_pooled(),
            norm_eps: d_eps(),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "width {} is not divisible by heads {}",
                self.width, self.heads
            ));
        }
        for (n, v, max) in [
            ("input_dim", self.input_dim, MAX_SIZE),
            ("width", self.width, MAX_SIZE),
            ("ff_mult", self.ff_mult, MAX_FF_MULT),
            ("layers", self.layers, MAX_LAYERS),
            ("num_latents", self.num_latents, MAX_SIZE),
            ("output_dim", self.output_dim, MAX_SIZE),
            ("pooled_dim", self.pooled_dim, MAX_SIZE),
        ] {
            if v == 0 {
                return Err(format!("`{n}` must be > 0"));
            }
            if v > max {
                return Err(format!(
                    "`{n}` is {v}, more than any resampler has (at most {max})"
                ));
            }
        }
        Ok(())
    }

    /// Every tensor with its shape: the checkpoint schema.
    pub fn schema(&self) -> Vec<(String, Vec<usize>)> {
        let (w, f) = (self.width, self.width * self.ff_mult);
        let mut s: Vec<(String, Vec<usize>)> = vec![
            ("proj_in.weight".into(), vec![w, self.input_dim]),
            ("proj_in.bias".into(), vec![w]),
            ("latents".into(), vec![self.num_latents, w]),
        ];
        for i in 0..self.layers {
            let p = format!("layers.{i}");
            for n in ["norm_media", "norm_latents", "ff.norm"] {
                s.push((format!("{p}.{n}.weight"), vec![w]));
                s.push((format!("{p}.{n}.bias"), vec![w]));
            }
            for n in ["to_q", "to_k", "to_v", "to_out"] {
                s.push((format!("{p}.attn.{n}.weight"), vec![w, w]));
            }
            s.push((format!("{p}.ff.fc1.weight"), vec![f, w]));
            s.push((format!("{p}.ff.fc1.bias"), vec![f]));
            s.push((format!("{p}.ff.fc2.weight"), vec![w, f]));
            s.push((format!("{p}.ff.fc2.bias"), vec![w]));
        }
        for n in ["norm_out", "pooled_norm"] {
            s.push((format!("{n}.weight"), vec![w]));
            s.push((format!("{n}.bias"), vec![w]));
        }
        s.push(("proj_out.weight".into(), vec![self.output_dim, w]));
        s.push(("proj_out.bias".into(), vec![self.output_dim]));
        s.push(("pooled_proj.weight".into(), vec![self.pooled_dim, w]));
        s.push(("pooled_proj.bias".into(), vec![self.pooled_dim]));
        s
    }

    pub fn parameter_count(&self) -> usize {
        self.schema()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Weights are f32 (small next to the LLM, and the trainer needs f32); f64 is kept as is for
/// gradient checks.
#[derive(Clone)]
pub struct Resampler {
    cfg: ResamplerConfig,
    params: BTreeMap<String, Tensor>,
}

impl Resampler {
    /// Builds from named tensors, checking that every tensor of the schema is there with its
    /// shape and that nothing else is. `origin` names the source in errors.
    pub fn from_tensors(
        cfg: ResamplerConfig,
        mut tensors: HashMap<String, Tensor>,
        origin: &Path,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|m| Error::format(origin, format!("resampler config: {m}")))?;
        let mut params = BTreeMap::new();
        for (name, shape) in cfg.schema() {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: origin.to_path_buf(),
                name: name.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Shape {
                    path: origin.to_path_buf(),
                    name,
                    expected: shape,
                    got: t.dims().to_vec(),
                });
            }
            let t = if t.dtype() == DType::F64 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            params.insert(name, t);
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::format(
                origin,
                format!("unexpected tensor `{extra}` (not part of the resampler layout; a key map may be needed)"),
            ));
        }
        Ok(Self { cfg, params })
    }

    /// Fresh weights: PyTorch's default Linear init, unit LayerNorms, small latents.
    pub fn init(cfg: ResamplerConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        cfg.validate()
            .map_err(|m| Error::Invalid(format!("resampler settings: {m}")))?;
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.schema() {
            let n: usize = shape.iter().product();
            let data = if name == "latents" {
                rng.normal_vec(n, 0.02)
            } else if name.contains("norm") {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                let fan_in = cfg_fan_in(&cfg, &name, &shape);
                rng.uniform_vec(n, 1.0 / (fan_in as f64).sqrt())
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(cfg, tensors, Path::new("<new resampler>"))
    }

    /// Loads `resampler.safetensors`; the config comes from its metadata unless given.
    pub fn load(path: &Path, cfg: Option<ResamplerConfig>, device: &Device) -> Result<Self> {
        let cfg = match cfg {
            Some(c) => c,
            None => {
                let meta = crate::formats::safetensors::read_metadata(path)?;
                let text = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
                    Error::format(
                        path,
                        format!("no `{CONFIG_METADATA_KEY}` config in the metadata"),
                    )
                })?;
                serde_json::from_str(text).map_err(|e| {
                    Error::format(path, format!("metadata `{CONFIG_METADATA_KEY}`: {e}"))
                })?
            }
        };
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file ({e})")))?;
        Self::from_tensors(cfg, tensors, path)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert(
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.cfg).expect("config serialises"),
        );
        // One metadata key only: the header's map order is not stable, the file must be.
        let tensors = self
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        save_atomic(&tensors, Some(meta), path)
    }

    pub fn config(&self) -> &ResamplerConfig {
        &self.cfg
    }

    pub fn params(&self) -> &BTreeMap<String, Tensor> {
        &self.params
    }

    fn p(&self, name: &str) -> &Tensor {
        &self.params[name]
    }

    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let w = self.p(&format!("{name}.weight"));
        ops::linear(x, w, self.params.get(&format!("{name}.bias")))
    }

    fn norm(&self, x: &Tensor, name: &str, path: ForwardMode) -> candle_core::Result<Tensor> {
        let (w, b) = (
            self.p(&format!("{name}.weight")),
            self.p(&format!("{name}.bias")),
        );
        ops::layer_norm(x, w, b, self.cfg.norm_eps, path)
    }

    /// `h`: `[B,T,input_dim]` (any float dtype); `mask`: `[B,T]` f32, 1 = token.
    /// Returns (`prompt_embeds` `[B,N,output_dim]`, `pooled` `[B,pooled_dim]`) in the weights'
    /// dtype (f32).
    pub fn forward(
        &self,
        h: &Tensor,
        mask: &Tensor,
        path: ForwardMode,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_weighted(h, mask, None, path)
    }

    /// `forward` with a weight per token (`[B,T]` f32, >= 0; 1 at padding): `ln w` is added
    /// to the attention logits the latents give that token in every layer, so its attention
    /// mass is scaled by `w` before the softmax renormalises. w = 1 adds exactly 0 (the plain
    /// result, bit for bit); w = 0 is the padding bias (the token is not attended to).
    pub fn forward_weighted(
        &self,
        h: &Tensor,
        mask: &Tensor,
        weights: Option<&Tensor>,
        path: ForwardMode,
    ) -> Result<(Tensor, Tensor)> {
        self.run(h, mask, weights, path, None)
    }

    /// The attention probabilities of every layer, `[B,heads,N,T+N]` each (keys: the T tokens,
    /// then the N latents), for inspecting what the latents read (and what weights do to it).
    pub fn attention_maps(
        &self,
        h: &Tensor,
        mask: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let mut maps = Vec::with_capacity(self.cfg.layers);
        self.run(h, mask, weights, ForwardMode::Fast, Some(&mut maps))?;
        Ok(maps)
    }

    fn run(
        &self,
        h: &Tensor,
        mask: &Tensor,
        weights: Option<&Tensor>,
        path: ForwardMode,
        mut maps: Option<&mut Vec<Tensor>>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, d) = h.dims3()?;
        if d != self.cfg.input_dim {
            return Err(Error::Mismatch(format!(
                "the resampler takes hidden states of width {} but the LLM gives [{b}, {t}, {d}]",
                self.cfg.input_dim
            )));
        }
        let (n, w, heads) = (self.cfg.num_latents, self.cfg.width, self.cfg.heads);
        let dh = w / heads;
        let dt = self.p("latents").dtype();
        let x = self.linear(&h.to_dtype(dt)?, "proj_in")?;
        let mut lat = self.p("latents").unsqueeze(0)?.broadcast_as((b, n, w))?;
        // Padded media keys get a large negative logit; latent keys are always visible.
        let mut media_bias = ((mask.to_dtype(dt)? - 1.0)? * -MASKED)?;
        if let Some(w) = weights {
            let log_w = w.to_dtype(dt)?.log()?.maximum(MASKED)?;
            media_bias = (media_bias + log_w)?;
        }
        let bias = Tensor::cat(&[&media_bias, &Tensor::zeros((b, n), dt, h.device())?], 1)?
            .reshape((b, 1, 1, t + n))?;
        for i in 0..self.cfg.layers {
            let p = format!("layers.{i}");
            let m = self.norm(&x, &format!("{p}.norm_media"), path)?;
            let l = self.norm(&lat, &format!("{p}.norm_latents"), path)?;
            let kv = Tensor::cat(&[&m, &l], 1)?;
            let heads_of = |y: Tensor, len: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, len, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = heads_of(self.linear(&l, &format!("{p}.attn.to_q"))?, n)?;
            let k = heads_of(self.linear(&kv, &format!("{p}.attn.to_k"))?, t + n)?;
            let v = heads_of(self.linear(&kv, &format!("{p}.attn.to_v"))?, t + n)?;
            let scores = (q.matmul(&k.t()?)? * (dh as f64).powf(-0.5))?.broadcast_add(&bias)?;
            let probs = ops::softmax(&scores, path)?;
            if let Some(maps) = maps.as_mut() {
                maps.push(probs.clone());
            }
            let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
            lat = (lat + self.linear(&a, &format!("{p}.attn.to_out"))?)?;
            let f = self.norm(&lat, &format!("{p}.ff.norm"), path)?;
            let f = self.linear(&f, &format!("{p}.ff.fc1"))?;
            let f = match path {
                ForwardMode::Fast => f.gelu_erf()?,
                ForwardMode::Differentiable => ops::gelu_erf(&f)?,
            };
            lat = (lat + self.linear(&f, &format!("{p}.ff.fc2"))?)?;
        }
        let embeds = self.linear(&self.norm(&lat, "norm_out", path)?, "proj_out")?;
        let pooled = self.linear(
            &self.norm(&lat.mean(1)?, "pooled_norm", path)?,
            "pooled_proj",
        )?;
        Ok((embeds, pooled))
    }
}

fn cfg_fan_in(cfg: &ResamplerConfig, name: &str, shape: &[usize]) -> usize {
    if name.ends_with(".bias") {
        // PyTorch bounds a bias by its layer's fan-in, i.e. the weight's second dim.
        let w = name.trim_end_matches(".bias").to_string() + ".weight";
        cfg.schema()
            .into_iter()
            .find(|(n, _)| *n == w)
            .map_or(shape[0], |(_, s)| s[1])
    } else {
        shape[1]
    }
}
