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
use crate::error::{Error, Result};
use crate::formats::gguf::{self, GgufFile, TensorReader};
use crate::formats::Weights;
use crate::lora::{Lora, Projection, Site};
use crate::ops::{self, Path as OpPath, QMatrix, MASKED};

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

/// The token embedding table: dense, or quantized GGUF blocks of which only the looked-up
/// rows are dequantized.
#[derive(Clone)]
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
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
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    source: Source,
    dtype: DType,
    device: Device,
    lora: Option<(Lora, LoraMode)>,
}

impl Attention {
    fn load(w: &Weights, p: &str, cfg: &Qwen3Config) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Projection::dense(w.get(&format!("{p}.q_proj.weight"), &[nh * hd, h])?),
            k_proj: Projection::dense(w.get(&format!("{p}.k_proj.weight"), &[nkv * hd, h])?),
            v_proj: Projection::dense(w.get(&format!("{p}.v_proj.weight"), &[nkv * hd, h])?),
            o_proj: Projection::dense(w.get(&format!("{p}.o_proj.weight"), &[h, nh * hd])?),
            q_norm: w.get(&format!("{p}.q_norm.weight"), &[hd])?,
            k_norm: w.get(&format!("{p}.k_norm.weight"), &[hd])?,
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
        })
    }

    /// `x`: `[B,T,H]`; `bias`: `[B,1,1,T,T]` additive mask in the softmax dtype (f32, or f64
    /// for an f64 model); `cos`/`sin`: `[T, hd/2]`.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        path: OpPath,
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

    fn linears_mut(&mut self) -> [(&'static str, &mut Projection); 4] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("o_proj", &mut self.o_proj),
        ]
    }
}

impl Mlp {
    fn load(w: &Weights, p: &str, cfg: &Qwen3Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Projection::dense(w.get(&format!("{p}.gate_proj.weight"), &[i, h])?),
            up_proj: Projection::dense(w.get(&format!("{p}.up_proj.weight"), &[i, h])?),
            down_proj: Projection::dense(w.get(&format!("{p}.down_proj.weight"), &[h, i])?),
        })
    }

    fn forward(&self, x: &Tensor, path: OpPath) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x, path)?;
        let up = self.up_proj.forward(x, path)?;
        self.down_proj.forward(&ops::silu_mul(&gate, &up)?, path)
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Projection); 3] {
        [
            ("gate_proj", &mut self.gate_proj),
            ("up_proj", &mut self.up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }
}

impl DecoderLayer {
    fn load(w: &Weights, i: usize, cfg: &Qwen3Config) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_attention_layernorm: w
                .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        eps: f64,
        path: OpPath,
    ) -> candle_core::Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps, path)?;
        let x = (x + self.self_attn.forward(&h, bias, cos, sin, path)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps, path)?;
        x + self.mlp.forward(&h, path)?
    }

    fn linear_mut(&mut self, module: &str) -> Option<&mut Projection> {
        let attn = self.self_attn.linears_mut().into_iter();
        let mlp = self.mlp.linears_mut().into_iter();
        attn.chain(mlp).find(|(n, _)| *n == module).map(|(_, l)| l)
    }
}

impl Attention {
    fn load_gguf(r: &mut Loader<'_, '_>, i: usize, cfg: &Qwen3Config) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: r.projection(&gguf::projection_name(i, "q_proj"), (nh * hd, h))?,
            k_proj: r.projection(&gguf::projection_name(i, "k_proj"), (nkv * hd, h))?,
            v_proj: r.projection(&gguf::projection_name(i, "v_proj"), (nkv * hd, h))?,
            o_proj: r.projection(&gguf::projection_name(i, "o_proj"), (h, nh * hd))?,
            q_norm: r.norm(&format!("blk.{i}.attn_q_norm.weight"), hd)?,
            k_norm: r.norm(&format!("blk.{i}.attn_k_norm.weight"), hd)?,
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
        })
    }
}

/// Reads a GGUF's tensors into model parts.
struct Loader<'g, 'r> {
    reader: &'r mut TensorReader<'g>,
    gguf: &'g GgufFile,
    dtype: DType,
    device: Device,
    opts: GgufOptions,
}

impl Loader<'_, '_> {
    /// Float tensors (and everything when dequantizing) become dense weights of the model
    /// dtype; quantized ones stay quantized.
    fn projection(&mut self, name: &str, shape: (usize, usize)) -> Result<Projection> {
        let entry = self.gguf.entry(name)?;
        if self.opts.dequantize || gguf::is_float(entry.dtype) {
            let w = self
                .reader
                .dense(name, &[shape.0, shape.1], self.dtype, &self.device)?;
            Ok(Projection::dense(w))
        } else {
            let q = self.reader.qmatrix(name, shape, &self.device)?;
            Ok(Projection::quantized(Arc::new(q)))
        }
    }

    fn norm(&mut self, name: &str, n: usize) -> Result<Tensor> {
        self.reader.dense(name, &[n], self.dtype, &self.device)
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
        let mut cfg = g.qwen3_config()?;
        if let Some(n) = opts.max_layers {
            cfg.num_hidden_layers = n.min(cfg.num_hidden_layers);
        }
        let mut reader = g.reader()?;
        let mut r = Loader {
            reader: &mut reader,
            gguf: g,
            dtype,
            device: device.clone(),
            opts,
        };
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let emb = g.entry("token_embd.weight")?;
        let embed_tokens = if opts.dequantize || gguf::is_float(emb.dtype) {
            Embedding::Dense(r.reader.dense(&emb.name, &[v, h], dtype, device)?)
        } else {
            Embedding::Quantized(Arc::new(r.reader.qmatrix(&emb.name, (v, h), device)?))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let i_ = cfg.intermediate_size;
            layers.push(DecoderLayer {
                input_layernorm: r.norm(&format!("blk.{i}.attn_norm.weight"), h)?,
                post_attention_layernorm: r.norm(&format!("blk.{i}.ffn_norm.weight"), h)?,
                self_attn: Attention::load_gguf(&mut r, i, &cfg)?,
                mlp: Mlp {
                    gate_proj: r.projection(&gguf::projection_name(i, "gate_proj"), (i_, h))?,
                    up_proj: r.projection(&gguf::projection_name(i, "up_proj"), (i_, h))?,
                    down_proj: r.projection(&gguf::projection_name(i, "down_proj"), (h, i_))?,
                },
            });
        }
        let norm = r.norm("output_norm.weight", h)?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            source: Source::Gguf(g.path().to_path_buf()),
            dtype,
            device: device.clone(),
            lora: None,
        })
    }

    pub fn from_weights(cfg: Qwen3Config, w: Arc<Weights>) -> Result<Self> {
        let embed_tokens = w.get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&w, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get("model.norm.weight", &[cfg.hidden_size])?;
        Ok(Self {
            cfg,
            dtype: embed_tokens.dtype(),
            device: embed_tokens.device().clone(),
            embed_tokens: Embedding::Dense(embed_tokens),
            layers,
            norm,
            source: Source::Safetensors(w),
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
        matches!(self.embed_tokens, Embedding::Quantized(_))
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
            Embedding::Dense(t) => size(t),
            Embedding::Quantized(q) => q.storage_bytes(),
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
        path: OpPath,
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
            Embedding::Dense(e) => e.index_select(&flat, 0)?,
            Embedding::Quantized(q) => q.embedding(&flat)?.to_dtype(self.dtype)?,
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
                let name = format!(
                    "model.{}.weight",
                    &site.peft_prefix()["base_model.model.model.".len()..]
                );
                l.weight = w.get(&name, &[out, inp])?;
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
        layer
            .linear_mut(&site.module)
            .ok_or_else(|| Error::Mismatch(format!("unknown projection {}", site.module)))
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
