//! Where the teacher's weights come from: a diffusers folder (`text_encoder/`,
//! `text_encoder_2/`, Hugging Face names) or a single-file SDXL checkpoint (the original
//! Stability layout: CLIP-L in Hugging Face names under `conditioner.embedders.0.transformer.`,
//! CLIP-G in open_clip names under `conditioner.embedders.1.model.`).
//!
//! The model code asks for [`Param`]s; a `Source` reads each under its name in the file's
//! layout (see [`super::schema`]), splits open_clip's fused `in_proj` into q/k/v, transposes
//! open_clip's `text_projection`, and remembers every tensor it handed out (for the
//! fingerprint).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip::{ClipTextConfig, Pooling};
use super::schema::{LayerModule, OpenClipKey, Param, HF_LAYERS, OPEN_CLIP_LAYERS};
use crate::error::{Error, Result};
use crate::formats::safetensors::count_numbered;
use crate::formats::Weights;

/// Prefix of CLIP-L (Hugging Face layout) in a single-file SDXL checkpoint.
pub const SINGLE_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of CLIP-G (open_clip layout) in a single-file SDXL checkpoint.
pub const SINGLE_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// How names map from Hugging Face to the file.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Same names, behind a prefix (`""` in a diffusers folder).
    Hf { prefix: String },
    /// open_clip `TextTransformer` names behind a prefix.
    OpenClip { prefix: String },
}

impl Layout {
    /// The name `param` has in the file (for open_clip, of the tensor it is read from).
    fn key(&self, param: Param) -> String {
        match self {
            Self::Hf { prefix } => format!("{prefix}{}", param.hf_name()),
            Self::OpenClip { prefix } => match param.open_clip() {
                OpenClipKey::Renamed(k)
                | OpenClipKey::InProj { key: k, .. }
                | OpenClipKey::Transposed(k) => format!("{prefix}{k}"),
            },
        }
    }

    /// Where the encoder layers are.
    fn layers_prefix(&self) -> String {
        match self {
            Self::Hf { prefix } => format!("{prefix}{HF_LAYERS}"),
            Self::OpenClip { prefix } => format!("{prefix}{OPEN_CLIP_LAYERS}"),
        }
    }
}

/// A view of a [`Weights`] set by [`Param`], for one encoder config.
pub(crate) struct Source<'a> {
    w: &'a Weights,
    layout: Layout,
    cfg: &'a ClipTextConfig,
    /// The last fused open_clip `in_proj` tensor loaded, so q, k and v read it once.
    fused: RefCell<Option<(String, Tensor)>>,
    /// Every tensor handed out, under its Hugging Face name.
    loaded: RefCell<Vec<(String, Tensor)>>,
}

impl<'a> Source<'a> {
    pub fn new(w: &'a Weights, layout: Layout, cfg: &'a ClipTextConfig) -> Self {
        Self {
            w,
            layout,
            cfg,
            fused: RefCell::new(None),
            loaded: RefCell::new(Vec::new()),
        }
    }

    pub fn origin(&self) -> &Path {
        self.w.origin()
    }

    /// The tensors loaded so far, in Hugging Face names.
    pub fn take_loaded(&self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut *self.loaded.borrow_mut())
    }

    pub fn config(&self) -> &ClipTextConfig {
        self.cfg
    }

    /// The tensor `param`, checked against its shape (Hugging Face orientation). Errors name
    /// the file and the key actually read.
    pub fn get(&self, param: Param) -> Result<Tensor> {
        let shape = param.shape(self.cfg);
        let key = self.layout.key(param);
        let t = match (&self.layout, param.open_clip()) {
            (Layout::OpenClip { .. }, OpenClipKey::InProj { part, .. }) => {
                let fused = self.fused_in_proj(&key, &shape)?;
                fused.narrow(0, part * shape[0], shape[0])?.contiguous()?
            }
            (Layout::OpenClip { .. }, OpenClipKey::Transposed(_)) => {
                self.w.get(&key, &[shape[1], shape[0]])?.t()?.contiguous()?
            }
            _ => self.w.get(&key, &shape)?,
        };
        self.loaded.borrow_mut().push((param.hf_name(), t.clone()));
        Ok(t)
    }

    /// `attn.in_proj_weight` `[3H,H]` / `in_proj_bias` `[3H]`: rows q, then k, then v (torch's
    /// `nn.MultiheadAttention` order).
    fn fused_in_proj(&self, key: &str, part: &[usize]) -> Result<Tensor> {
        if let Some((k, t)) = &*self.fused.borrow() {
            if k == key {
                return Ok(t.clone());
            }
        }
        let mut shape = part.to_vec();
        shape[0] *= 3;
        let t = self.w.get(key, &shape)?;
        *self.fused.borrow_mut() = Some((key.to_string(), t.clone()));
        Ok(t)
    }
}

/// The safetensors of one diffusers component folder: `model.safetensors`, a sharded
/// `model.safetensors.index.json`, or `model.fp16.safetensors` (the `variant="fp16"` download).
pub(crate) fn open_component(dir: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    let fp16 = dir.join("model.fp16.safetensors");
    if single.is_file() {
        Weights::open(std::slice::from_ref(&single), &single, dtype, device)
    } else if dir.join("model.safetensors.index.json").is_file() {
        Weights::open_model_dir(dir, dtype, device)
    } else if fp16.is_file() {
        Weights::open(std::slice::from_ref(&fp16), &fp16, dtype, device)
    } else {
        Err(Error::format(
            dir,
            "no model.safetensors, model.safetensors.index.json or model.fp16.safetensors in this folder",
        ))
    }
}

/// Heads of a checkpoint without a config: 12 for width 768 (CLIP-L), 20 for 1280 (CLIP-G),
/// otherwise head_dim 64 (`width / 64`), which is what both of those use.
pub fn infer_heads(path: &Path, hidden: usize) -> Result<usize> {
    match hidden {
        768 => Ok(12),
        1280 => Ok(20),
        h if h % 64 == 0 => Ok(h / 64),
        h => Err(Error::format(
            path,
            format!("cannot infer the attention heads of a text encoder of width {h} (not a multiple of 64)"),
        )),
    }
}

/// The 2-D shape of `name`, or an error naming the file and tensor.
fn shape2(w: &Weights, name: &str) -> Result<(usize, usize)> {
    match w.shape_of(name)?.as_slice() {
        &[a, b] => Ok((a, b)),
        other => Err(Error::format(
            w.origin(),
            format!("tensor `{name}` has shape {other:?}, expected 2 dimensions"),
        )),
    }
}

/// Config, pooling rule and layout of CLIP-L in a single-file SDXL checkpoint
/// (Hugging Face names under [`SINGLE_L_PREFIX`]). Activation quick_gelu, eps 1e-5.
pub(crate) fn single_file_clip_l(
    w: &Weights,
    names: &[String],
) -> Result<(ClipTextConfig, Pooling, Layout)> {
    let layout = Layout::Hf {
        prefix: SINGLE_L_PREFIX.to_string(),
    };
    single_file_encoder(w, names, layout, "CLIP-L", "quick_gelu", false)
}

/// Config, pooling rule and layout of CLIP-G in a single-file SDXL checkpoint (open_clip
/// names under [`SINGLE_G_PREFIX`]). Activation gelu (erf), eps 1e-5.
pub(crate) fn single_file_clip_g(
    w: &Weights,
    names: &[String],
) -> Result<(ClipTextConfig, Pooling, Layout)> {
    let layout = Layout::OpenClip {
        prefix: SINGLE_G_PREFIX.to_string(),
    };
    single_file_encoder(w, names, layout, "CLIP-G", "gelu", true)
}

/// One encoder's config read off its tensor shapes; `projected`: it has `text_projection`.
fn single_file_encoder(
    w: &Weights,
    names: &[String],
    layout: Layout,
    what: &str,
    act: &str,
    projected: bool,
) -> Result<(ClipTextConfig, Pooling, Layout)> {
    let (vocab, hidden) = shape2(w, &layout.key(Param::TokenEmbedding))?;
    let (max_pos, _) = shape2(w, &layout.key(Param::PositionEmbedding))?;
    let layers_prefix = layout.layers_prefix();
    let layers = count_numbered(names, &layers_prefix);
    if layers == 0 {
        return Err(Error::format(
            w.origin(),
            format!("no `{layers_prefix}*` tensors ({what} layers)"),
        ));
    }
    let [fc1, _] = Param::module(0, LayerModule::Fc1);
    let (ffn, _) = shape2(w, &layout.key(fc1))?;
    let projection_dim = if projected {
        let key = layout.key(Param::Projection);
        let (proj_in, proj) = shape2(w, &key)?;
        if proj_in != hidden {
            return Err(Error::format(
                w.origin(),
                format!(
                    "tensor `{key}` has shape [{proj_in}, {proj}], expected [{hidden}, P] (open_clip applies it as x @ text_projection)"
                ),
            ));
        }
        Some(proj)
    } else {
        None
    };
    let cfg = inferred_config(
        w.origin(),
        vocab,
        hidden,
        ffn,
        layers,
        max_pos,
        act,
        projection_dim,
    )?;
    Ok((cfg, pooling_for_vocab(vocab), layout))
}

/// CLIP's vocabulary ends with the start and end tokens (49406, 49407): without a config the
/// end token is the last id, pooled at its first occurrence (ComfyUI's rule; for tokenized
/// prompts the same position as `transformers`' argmax rule of SDXL's own configs).
fn pooling_for_vocab(vocab: usize) -> Pooling {
    Pooling::FirstToken(vocab as u32 - 1)
}

#[allow(clippy::too_many_arguments)]
fn inferred_config(
    path: &Path,
    vocab: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    max_pos: usize,
    act: &str,
    projection_dim: Option<usize>,
) -> Result<ClipTextConfig> {
    let cfg = ClipTextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: infer_heads(path, hidden)?,
        max_position_embeddings: max_pos,
        hidden_act: act.to_string(),
        layer_norm_eps: 1e-5,
        projection_dim,
        eos_token_id: vocab.saturating_sub(1) as u32,
    };
    cfg.validate().map_err(|msg| Error::format(path, msg))?;
    Ok(cfg)
}

/// Checks that `path` is a single-file SDXL checkpoint, with a hint when it is something else.
pub(crate) fn check_single_file(path: &Path, names: &[String]) -> Result<()> {
    let has = |p: &str| names.iter().any(|n| n.starts_with(p));
    let l = has(&format!("{SINGLE_L_PREFIX}text_model."));
    let g = has(SINGLE_G_PREFIX);
    if l && g {
        return Ok(());
    }
    let hint = if has("cond_stage_model.") {
        " (it has `cond_stage_model.*`: an SD 1.x/2.x checkpoint, which has no CLIP-G)"
    } else if has("text_model.") {
        " (it has bare `text_model.*` tensors: one text encoder; pass the diffusers folder that holds text_encoder/ and text_encoder_2/)"
    } else {
        ""
    };
    let missing = match (l, g) {
        (false, false) => {
            format!("`{SINGLE_L_PREFIX}text_model.*` (CLIP-L) and `{SINGLE_G_PREFIX}*` (CLIP-G)")
        }
        (false, true) => format!("`{SINGLE_L_PREFIX}text_model.*` (CLIP-L)"),
        _ => format!("`{SINGLE_G_PREFIX}*` (CLIP-G)"),
    };
    Err(Error::format(
        path,
        format!("not a single-file SDXL checkpoint: no {missing} tensors{hint}"),
    ))
}

/// A component folder of a diffusers SDXL pipeline, or an error naming what is missing.
pub(crate) fn component_dir(root: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::format(
            root,
            format!("no {name}/ folder ({what}): an SDXL diffusers folder needs text_encoder/ and text_encoder_2/"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_follow_clip_widths() {
        let p = Path::new("x.safetensors");
        assert_eq!(infer_heads(p, 768).unwrap(), 12);
        assert_eq!(infer_heads(p, 1280).unwrap(), 20);
        assert_eq!(infer_heads(p, 1024).unwrap(), 16);
        assert!(infer_heads(p, 100).is_err());
    }

    #[test]
    fn layers_are_counted_from_names() {
        let names: Vec<String> = ["a.0.x", "a.11.y", "a.3.z", "b.40.x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(count_numbered(&names, "a."), 12);
        assert_eq!(count_numbered(&names, "c."), 0);
    }
}
