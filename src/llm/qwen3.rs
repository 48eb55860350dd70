//! Qwen3 decoder returning hidden states, matching Hugging Face `transformers`'
//! `Qwen3Model` (`hidden_states` tuple) for right-padded batches with an attention mask.
//!
//! Unlike candle-transformers' `qwen3`: takes a padding mask, stops at any layer, keeps no KV
//! cache (encoding is one pass), can run on differentiable kernels with frozen base weights,
//! and carries LoRA on any projection. Loads Hugging Face safetensors or a llama.cpp GGUF
//! (quantized projections stay quantized; see `docs/gguf.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::Qwen3Config;
use super::load::{GgufSource, Matrix, TensorSource};
use super::schema::{Module, Param};
use crate::error::{Error, Result};
use crate::formats::gguf::{self, GgufFile};
use crate::formats::Weights;
use crate::lora::{Lora, Projection, Site};
use crate::ops::{self, ForwardMode, MASKED};

/// How a LoRA is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    /// `W + sBA` folded into the weight: inference cost of the bare model. On a GGUF base the
    /// LoRA stays unmerged instead (folding it into quantized blocks would lose most of it).
    Merged,
    /// Kept apart so that `A` and `B` can be trained.
    Unmerged,
}

/// `Qwen3Attention`: q/k/v/o projections, per-head RMSNorm on q and k, RoPE, GQA.
#[derive(Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    q_norm: Tensor,
    k_norm: Tensor,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    eps: f64,
}

/// `Qwen3MLP`: `down(silu(gate(x)) * up(x))`.
#[derive(Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

/// `Qwen3DecoderLayer`: pre-norm attention and MLP with residuals.
#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    self_attn: Attention,
    mlp: Mlp,
}

/// Where the weights came from.
#[derive(Clone)]
enum Source {
    /// Kept mapped so un-merging a LoRA re-reads the original weights instead of subtracting.
    Safetensors(Arc<Weights>),
    Gguf(PathBuf),
}

/// How a GGUF base is loaded (see [`Qwen3::load_gguf`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufOptions {
    /// Expand every quantized weight into a dense tensor of the model dtype: the f32
    /// reference the quantized path is compared with (tests, benchmarks).
    pub dequantize: bool,
    /// Load only the first N decoder layers (benchmarks on a memory budget).
    pub max_layers: Option<usize>,
}

#[derive(Clone)]
pub struct Qwen3 {
    cfg: Qwen3Config,
    embed_tokens: Matrix,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    source: Source,
    dtype: DType,
    device: Device,
    lora: Option<(Lora, LoraMode)>,
}

impl Attention {
    /// `x`: `[B,T,H]`; `bias`: `[B,1,1,T,T]` additive mask in the softmax dtype (f32, or f64
    /// for an f64 model); `cos`/`sin`: `[T, hd/2]`.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        path: ForwardMode,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv);
        let q = self.q_proj.forward(x, path)?.reshape((b, t, nh, hd))?;
        let k = self.k_proj.forward(x, path)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(x, path)?.reshape((b, t, nkv, hd))?;
        let q = ops::rms_norm(&q, &self.q_norm, self.eps, path)?;
        let k = ops::rms_norm(&k, &self.k_norm, self.eps, path)?;
        let q = ops::rope_heads(&q, cos, sin, path)?;
        let k = ops::rope_heads(&k, cos, sin, path)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let out = ops::attention(&q, &k, &v, bias, path)?;
        self.o_proj.forward(&out, path)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, path: ForwardMode) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x, path)?;
        let up = self.up_proj.forward(x, path)?;
        self.down_proj.forward(&ops::silu_mul(&gate, &up)?, path)
    }
}

impl DecoderLayer {
    fn load(src: &mut impl TensorSource, cfg: &Qwen3Config, i: usize) -> Result<Self> {
        let t = |p| cfg.layer_tensor(i, p);
        let proj = |m| t(Param::Projection(m));
        Ok(Self {
            input_layernorm: src.dense(&t(Param::InputNorm))?,
            post_attention_layernorm: src.dense(&t(Param::PostAttentionNorm))?,
            self_attn: Attention {
                q_proj: src.projection(&proj(Module::QProj))?,
                k_proj: src.projection(&proj(Module::KProj))?,
                v_proj: src.projection(&proj(Module::VProj))?,
                o_proj: src.projection(&proj(Module::OProj))?,
                q_norm: src.dense(&t(Param::QNorm))?,
                k_norm: src.dense(&t(Param::KNorm))?,
                n_heads: cfg.num_attention_heads,
                n_kv: cfg.num_key_value_heads,
                head_dim: cfg.head_dim(),
                eps: cfg.rms_norm_eps,
            },
            mlp: Mlp {
                gate_proj: src.projection(&proj(Module::GateProj))?,
                up_proj: src.projection(&proj(Module::UpProj))?,
                down_proj: src.projection(&proj(Module::DownProj))?,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        eps: f64,
        path: ForwardMode,
    ) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps, path)?;
        let x = (x + self.self_attn.forward(&h, bias, cos, sin, path)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps, path)?;
        x + self.mlp.forward(&h, path)?
    }

    fn projection_mut(&mut self, m: Module) -> &mut Projection {
        let (a, f) = (&mut self.self_attn, &mut self.mlp);
        match m {
            Module::QProj => &mut a.q_proj,
            Module::KProj => &mut a.k_proj,
            Module::VProj => &mut a.v_proj,
            Module::OProj => &mut a.o_proj,
            Module::GateProj => &mut f.gate_proj,
            Module::UpProj => &mut f.up_proj,
            Module::DownProj => &mut f.down_proj,
        }
    }
}

impl Qwen3 {
    /// Loads a Hugging Face model folder (`config.json` + safetensors), or a `.gguf` file
    /// (see [`Qwen3::load_gguf`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if gguf::is_gguf(dir) {
            return Self::load_gguf(dir, dtype, device, GgufOptions::default());
        }
        let cfg = Qwen3Config::load(&dir.join("config.json"))?;
        let weights = Weights::open_model_dir(dir, dtype, device)?;
        Self::from_weights(cfg, Arc::new(weights))
    }

    /// Loads a llama.cpp GGUF Qwen3. Quantized projections stay quantized in memory (a
    /// LoRA on them is always unmerged); the token embedding stays quantized too (only the
    /// rows of the prompt's tokens are dequantized); float tensors (norms, F16/F32 weights)
    /// become dense tensors of `dtype`, which is also the activation dtype.
    pub fn load_gguf(
        path: &Path,
        dtype: DType,
        device: &Device,
        opts: GgufOptions,
    ) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?, dtype, device, opts)
    }

    pub fn from_gguf(
        g: &GgufFile,
        dtype: DType,
        device: &Device,
        opts: GgufOptions,
    ) -> Result<Self> {
        let mut cfg = Qwen3Config::from_gguf(g)?;
        if let Some(n) = opts.max_layers {
            cfg.num_hidden_layers = n.min(cfg.num_hidden_layers);
        }
        let mut src = GgufSource {
            reader: g.reader()?,
            gguf: g,
            dtype,
            device: device.clone(),
            opts,
        };
        let source = Source::Gguf(g.path().to_path_buf());
        Self::build(cfg, &mut src, source, dtype, device)
    }

    pub fn from_weights(cfg: Qwen3Config, w: Arc<Weights>) -> Result<Self> {
        let (dtype, device) = (w.dtype(), w.device().clone());
        Self::build(
            cfg,
            &mut &*w,
            Source::Safetensors(w.clone()),
            dtype,
            &device,
        )
    }

    /// Reads every tensor the encoder needs, in checkpoint order.
    fn build(
        cfg: Qwen3Config,
        src: &mut impl TensorSource,
        source: Source,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let embed_tokens = src.matrix(&cfg.tensor(Param::Embedding))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = src.dense(&cfg.tensor(Param::FinalNorm))?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            source,
            dtype,
            device: device.clone(),
            lora: None,
        })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dtype of the activations (and of every dense weight).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The GGUF file this model was loaded from, if any.
    pub fn gguf_path(&self) -> Option<&Path> {
        match &self.source {
            Source::Gguf(p) => Some(p),
            Source::Safetensors(_) => None,
        }
    }

    /// True when at least one projection (or the embedding) is held quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.embed_tokens, Matrix::Quantized(_))
            || self
                .projections()
                .any(|p| matches!(p, Projection::Quantized(_)))
    }

    fn projections(&self) -> impl Iterator<Item = &Projection> {
        self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
        })
    }

    /// Bytes held by the weights (embedding, layers, norms, any LoRA) on the model's device;
    /// quantized weights count their blocks.
    pub fn weight_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let norms: usize = self
            .layers
            .iter()
            .map(|l| {
                size(&l.self_attn.q_norm)
                    + size(&l.self_attn.k_norm)
                    + size(&l.input_layernorm)
                    + size(&l.post_attention_layernorm)
            })
            .sum();
        let embed = match &self.embed_tokens {
            Matrix::Dense(t) => size(t),
            Matrix::Quantized(q) => q.storage_bytes(),
        };
        let projections: usize = self.projections().map(Projection::weight_bytes).sum();
        embed + size(&self.norm) + norms + projections
    }

    pub fn lora(&self) -> Option<&(Lora, LoraMode)> {
        self.lora.as_ref()
    }

    /// Hidden states at `transformers` index `hidden_layer` (see
    /// [`Qwen3Config::resolve_hidden_layer`]). `ids`: `[B,T]` u32; `mask`: one row of 0/1 per
    /// prompt (1 = token). Output `[B,T,H]` in the model dtype; rows at padded positions are
    /// finite but meaningless.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &[Vec<u8>],
        hidden_layer: i32,
        path: ForwardMode,
    ) -> Result<Tensor> {
        let n_layers = self.cfg.resolve_hidden_layer(hidden_layer)?;
        let (b, t) = ids.dims2()?;
        if mask.len() != b || mask.iter().any(|m| m.len() != t) {
            return Err(Error::Invalid(format!(
                "attention mask must be {b} rows of {t}, got {} rows",
                mask.len()
            )));
        }
        let flat = ids.flatten_all()?;
        let mut x = match &self.embed_tokens {
            Matrix::Dense(e) => e.index_select(&flat, 0)?,
            Matrix::Quantized(q) => q.embedding(&flat)?.to_dtype(self.dtype)?,
        }
        .reshape((b, t, self.cfg.hidden_size))?;
        let bias =
            causal_padding_bias(mask, self.device())?.to_dtype(ops::compute_dtype(self.dtype()))?;
        let (cos, sin) = rope_tables(&self.cfg, t, self.dtype(), self.device())?;
        for layer in &self.layers[..n_layers.min(self.cfg.num_hidden_layers)] {
            x = layer.forward(&x, &bias, &cos, &sin, self.cfg.rms_norm_eps, path)?;
        }
        if n_layers == self.cfg.num_hidden_layers {
            x = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps, path)?;
        }
        Ok(x)
    }

    /// Attaches a LoRA, replacing any previous one. Shapes are checked against this base
    /// first; on error the model is unchanged. `Merged` on a GGUF base keeps the LoRA
    /// unmerged (see [`LoraMode::Merged`]); [`Qwen3::lora`] reports the mode in effect.
    pub fn set_lora(&mut self, lora: Lora, mode: LoraMode) -> Result<()> {
        let scale = lora.config.scale();
        for (site, pair) in &lora.pairs {
            let (out, inp) = self.linear_shape(site)?;
            let (a, b) = (pair.a.dims(), pair.b.dims());
            if a[1] != inp || b[0] != out {
                return Err(Error::Mismatch(format!(
                    "{}: LoRA A {:?} / B {:?} need a base weight of [{}, {}], this base has [{out}, {inp}] ({})",
                    site.peft_prefix(),
                    a,
                    b,
                    b[0],
                    a[1],
                    self.cfg.shape_summary()
                )));
            }
        }
        self.clear_lora()?;
        let mode = match self.source {
            Source::Gguf(_) => LoraMode::Unmerged,
            Source::Safetensors(_) => mode,
        };
        for (site, pair) in &lora.pairs {
            let lin = self.linear_mut(site)?;
            match (mode, &mut *lin) {
                (LoraMode::Merged, Projection::Dense(l)) => {
                    l.weight = l.merged_weight(pair, scale)?
                }
                _ => lin.set_lora(Some((pair.clone(), scale))),
            }
        }
        self.lora = Some((lora, mode));
        Ok(())
    }

    /// Removes the LoRA; merged weights are re-read from the mapped base files.
    pub fn clear_lora(&mut self) -> Result<()> {
        let Some((lora, mode)) = self.lora.take() else {
            return Ok(());
        };
        for site in lora.pairs.keys() {
            let (out, inp) = self.linear_shape(site)?;
            let source = self.source.clone();
            let lin = self.linear_mut(site)?;
            lin.set_lora(None);
            if let (LoraMode::Merged, Source::Safetensors(w), Projection::Dense(l)) =
                (mode, source, lin)
            {
                l.weight = w.get(&format!("{}.weight", site.module_path()), &[out, inp])?;
            }
        }
        Ok(())
    }

    fn linear_shape(&mut self, site: &Site) -> Result<(usize, usize)> {
        Ok(self.linear_mut(site)?.out_in())
    }

    fn linear_mut(&mut self, site: &Site) -> Result<&mut Projection> {
        let n = self.layers.len();
        let summary = self.cfg.shape_summary();
        let layer = self.layers.get_mut(site.layer).ok_or_else(|| {
            Error::Mismatch(format!(
                "LoRA targets layer {} but this base has {n} layers ({summary})",
                site.layer
            ))
        })?;
        let m = Module::from_name(&site.module)
            .ok_or_else(|| Error::Mismatch(format!("unknown projection {}", site.module)))?;
        Ok(layer.projection_mut(m))
    }
}

/// `[B,1,1,T,T]` f32: 0 where query `i` may attend key `j` (`j <= i` and `j` is a token),
/// [`MASKED`] elsewhere. Shaped to broadcast over KV heads and query groups.
fn causal_padding_bias(mask: &[Vec<u8>], device: &Device) -> candle_core::Result<Tensor> {
    let b = mask.len();
    let t = mask.first().map_or(0, Vec::len);
    let mut data = vec![0f32; b * t * t];
    for (bi, row) in mask.iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                if j > i || row[j] == 0 {
                    data[(bi * t + i) * t + j] = MASKED as f32;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, 1, t, t), device)
}

/// RoPE `cos`/`sin` tables `[T, head_dim/2]`, computed in f32 then cast, as `transformers` does.
fn rope_tables(
    cfg: &Qwen3Config,
    t: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, hd / 2), device)?;
    let pos = Tensor::arange(0u32, t as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
