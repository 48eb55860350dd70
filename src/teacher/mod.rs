//! The SDXL teacher: CLIP-L + CLIP-G text encoders producing exactly what the SDXL UNet takes,
//! as diffusers' `StableDiffusionXLPipeline.encode_prompt` (and ComfyUI's
//! `CLIPTextEncodeSDXL`) build it:
//!
//! ```text
//! prompt ──CLIP tokenizer──> 77 ids (L: pad 49407, G: pad 0)
//!   CLIP-L hidden_states[-2] [B,77,768]  ┐
//!   CLIP-G hidden_states[-2] [B,77,1280] ┴─ concat ─> prompt_embeds [B,77,2048]
//!   CLIP-G final_layer_norm(last)[end token] @ text_projection ─> pooled [B,1280]
//! ```
//!
//! Loads a diffusers folder (`text_encoder/`, `text_encoder_2/`, optional `tokenizer/`,
//! `tokenizer_2/`) or a single-file SDXL checkpoint (`.safetensors`, memory-mapped; the UNet and
//! VAE tensors in it are never read). See [`checkpoint`] for the layouts and [`clip`] for the
//! model.

pub mod checkpoint;
pub mod clip;
pub mod schema;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::formats::Weights;
use checkpoint::{Layout, Source};
pub use clip::{Activation, ClipTextConfig, ClipTextModel, ClipTextOutput, Pooling, Role};
pub use tokenizer::{
    ClipTokenizer, Padding, SdxlIds, CLIP_G_PAD_ID, EMBEDDED_CLIP_TOKENIZER, MAX_PROMPT_TOKENS,
    SEQ_LEN,
};

/// Elements hashed per tensor for the fingerprint (evenly spaced; all of them if fewer).
pub const FINGERPRINT_SAMPLE: usize = 65_536;

/// SDXL conditioning from the teacher, always f32.
#[derive(Debug, Clone)]
pub struct TeacherOutput {
    /// `[B,77,D]`, D = CLIP-L width + CLIP-G width (2048 for SDXL).
    pub prompt_embeds: Tensor,
    /// `[B,P]`, P = CLIP-G `projection_dim` (1280 for SDXL).
    pub pooled: Tensor,
    /// Per prompt, tokens beyond the 75 that fit (0 when nothing was cut).
    pub dropped_tokens: Vec<usize>,
}

/// Token ids of a batch for both encoders.
#[derive(Debug, Clone)]
pub struct SdxlTokens {
    /// `[B][77]`, padded with the end token.
    pub ids_l: Vec<Vec<u32>>,
    /// `[B][77]`, padded with 0.
    pub ids_g: Vec<Vec<u32>>,
    pub dropped: Vec<usize>,
}

/// What the teacher was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeacherSource {
    Diffusers(PathBuf),
    SingleFile(PathBuf),
}

pub struct Teacher {
    source: TeacherSource,
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    tok_l: ClipTokenizer,
    tok_g: ClipTokenizer,
    notes: Vec<String>,
    fingerprint: String,
}

impl Teacher {
    /// A diffusers SDXL folder or a single-file SDXL `.safetensors`, in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(path, device, DType::F32)
    }

    /// Like [`Teacher::load`] with the compute dtype of the weights (outputs are f32 anyway).
    pub fn load_with_dtype(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if path.is_dir() {
            Self::load_diffusers(path, device, dtype)
        } else if path.is_file() {
            Self::load_single_file(path, device, dtype)
        } else {
            Err(Error::format(
                path,
                "not found (expected a diffusers SDXL folder or a single-file SDXL .safetensors)",
            ))
        }
    }

    fn load_diffusers(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let dir_l = checkpoint::component_dir(root, "text_encoder", "CLIP-L")?;
        let dir_g = checkpoint::component_dir(root, "text_encoder_2", "CLIP-G")?;
        let cfg_l = ClipTextConfig::load(&dir_l.join("config.json"))?;
        let cfg_g = ClipTextConfig::load(&dir_g.join("config.json"))?;
        let w_l = checkpoint::open_component(&dir_l, dtype, device)?;
        let w_g = checkpoint::open_component(&dir_g, dtype, device)?;
        let hf = || Layout::Hf {
            prefix: String::new(),
        };
        let (pool_l, pool_g) = (
            Pooling::from_eos_token_id(cfg_l.eos_token_id),
            Pooling::from_eos_token_id(cfg_g.eos_token_id),
        );
        let (clip_l, loaded_l) = load_encoder(&w_l, hf(), cfg_l, pool_l, Role::Penultimate)?;
        let (clip_g, loaded_g) =
            load_encoder(&w_g, hf(), cfg_g, pool_g, Role::PenultimateAndPooled)?;
        let mut notes = Vec::new();
        let tok_l = folder_tokenizer(root, "tokenizer", &mut notes)?;
        let tok_g = folder_tokenizer(root, "tokenizer_2", &mut notes)?;
        Self::assemble(
            TeacherSource::Diffusers(root.to_path_buf()),
            (clip_l, loaded_l),
            (clip_g, loaded_g),
            (tok_l, tok_g),
            notes,
        )
    }

    fn load_single_file(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let w = Weights::open(&[path.to_path_buf()], path, dtype, device)?;
        let names = w.names();
        checkpoint::check_single_file(path, &names)?;
        let (cfg_l, pool_l, layout_l) = checkpoint::single_file_clip_l(&w, &names)?;
        let (cfg_g, pool_g, layout_g) = checkpoint::single_file_clip_g(&w, &names)?;
        let clip_l = load_encoder(&w, layout_l, cfg_l, pool_l, Role::Penultimate)?;
        let clip_g = load_encoder(&w, layout_g, cfg_g, pool_g, Role::PenultimateAndPooled)?;
        let notes = vec![
            "single-file checkpoint: no configs (shapes inferred; CLIP-L quick_gelu, CLIP-G gelu, eps 1e-5, heads = width/64) and no tokenizer (using the embedded CLIP tokenizer)".to_string(),
        ];
        Self::assemble(
            TeacherSource::SingleFile(path.to_path_buf()),
            clip_l,
            clip_g,
            (ClipTokenizer::embedded()?, ClipTokenizer::embedded()?),
            notes,
        )
    }

    fn assemble(
        source: TeacherSource,
        (clip_l, loaded_l): (ClipTextModel, Vec<(String, Tensor)>),
        (clip_g, loaded_g): (ClipTextModel, Vec<(String, Tensor)>),
        (tok_l, tok_g): (ClipTokenizer, ClipTokenizer),
        notes: Vec<String>,
    ) -> Result<Self> {
        for m in [&clip_l, &clip_g] {
            if m.config().max_position_embeddings < SEQ_LEN {
                return Err(Error::format(
                    m.origin(),
                    format!(
                        "max_position_embeddings is {}, SDXL needs {SEQ_LEN}",
                        m.config().max_position_embeddings
                    ),
                ));
            }
        }
        let fingerprint = fingerprint(&clip_l, &loaded_l, &clip_g, &loaded_g)?;
        Ok(Self {
            source,
            clip_l,
            clip_g,
            tok_l,
            tok_g,
            notes,
            fingerprint,
        })
    }

    pub fn source(&self) -> &TeacherSource {
        &self.source
    }

    pub fn clip_l(&self) -> &ClipTextModel {
        &self.clip_l
    }

    pub fn clip_g(&self) -> &ClipTextModel {
        &self.clip_g
    }

    pub fn tokenizers(&self) -> (&ClipTokenizer, &ClipTokenizer) {
        (&self.tok_l, &self.tok_g)
    }

    /// Things worth telling a user about how the teacher was loaded (fallbacks, inferences).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// `(D, P)`: width of `prompt_embeds` (CLIP-L + CLIP-G hidden sizes) and of `pooled`.
    pub fn output_dims(&self) -> (usize, usize) {
        (
            self.clip_l.hidden_size() + self.clip_g.hidden_size(),
            self.clip_g.projection_dim().unwrap_or(0),
        )
    }

    pub fn device(&self) -> &Device {
        self.clip_l.device()
    }

    /// `sha256:<hex>` over the weights that shape the outputs, in a canonical form shared by
    /// both layouts (so a diffusers folder and the single file made from it agree):
    /// a version tag, the compute dtype, per encoder its activation, eps, heads and layer
    /// count, then per tensor (sorted by Hugging Face name, after open_clip's q/k/v split and
    /// projection transpose) the name, the shape and the f32 little-endian bytes of
    /// [`FINGERPRINT_SAMPLE`] evenly spaced elements (all elements of smaller tensors).
    /// CLIP-L's last layer and final norm, which SDXL never uses, are not part of it; nor are
    /// the tokenizer and the pooling rule (both layouts pool at the same end token).
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// A few lines describing the teacher, for `info`-style output.
    pub fn describe(&self) -> String {
        let (d, p) = self.output_dims();
        let src = match &self.source {
            TeacherSource::Diffusers(p) => format!("diffusers folder {}", p.display()),
            TeacherSource::SingleFile(p) => format!("single-file checkpoint {}", p.display()),
        };
        let enc = |name: &str, m: &ClipTextModel| {
            let c = m.config();
            format!(
                "  {name}: hidden {}, {} layers, {} heads, ffn {}, vocab {}, {}, pooling {:?} ({})",
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                m.activation().name(),
                m.pooling(),
                m.origin().display()
            )
        };
        let mut lines = vec![
            format!("SDXL teacher: {src}"),
            enc("CLIP-L", &self.clip_l),
            enc("CLIP-G", &self.clip_g),
            format!("  prompt_embeds [B,{SEQ_LEN},{d}], pooled [B,{p}]"),
            format!(
                "  tokenizers: {} / {}",
                self.tok_l.describe(),
                self.tok_g.describe()
            ),
            format!("  fingerprint {}", self.fingerprint),
        ];
        lines.extend(self.notes.iter().map(|n| format!("  note: {n}")));
        lines.join("\n")
    }

    /// SDXL ids for both encoders.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<SdxlTokens> {
        let mut out = SdxlTokens {
            ids_l: Vec::with_capacity(prompts.len()),
            ids_g: Vec::with_capacity(prompts.len()),
            dropped: Vec::with_capacity(prompts.len()),
        };
        for p in prompts {
            let l = self.tok_l.encode_sdxl(p, Padding::EndToken)?;
            let g = self.tok_g.encode_sdxl(p, Padding::Id(CLIP_G_PAD_ID))?;
            out.dropped.push(l.dropped.max(g.dropped));
            out.ids_l.push(l.ids);
            out.ids_g.push(g.ids);
        }
        Ok(out)
    }

    /// Encodes prompts (the empty prompt is valid; an empty batch is not).
    pub fn encode(&self, prompts: &[&str]) -> Result<TeacherOutput> {
        if prompts.is_empty() {
            return Err(Error::Invalid("no prompts to encode".into()));
        }
        let tokens = self.tokenize(prompts)?;
        let dev = self.device();
        let ids = |rows: &[Vec<u32>]| {
            Tensor::from_vec(rows.concat(), (rows.len(), SEQ_LEN), dev).map_err(Error::from)
        };
        let (prompt_embeds, pooled) =
            self.encode_ids(&ids(&tokens.ids_l)?, &ids(&tokens.ids_g)?)?;
        Ok(TeacherOutput {
            prompt_embeds,
            pooled,
            dropped_tokens: tokens.dropped,
        })
    }

    /// Already tokenized ids (`[B,T]` each) -> `(prompt_embeds [B,T,D], pooled [B,P])` in f32.
    pub fn encode_ids(&self, ids_l: &Tensor, ids_g: &Tensor) -> Result<(Tensor, Tensor)> {
        if ids_l.dims() != ids_g.dims() {
            return Err(Error::Invalid(format!(
                "CLIP-L ids {:?} and CLIP-G ids {:?} differ in shape",
                ids_l.dims(),
                ids_g.dims()
            )));
        }
        let l = self.clip_l.forward(ids_l)?;
        let g = self.clip_g.forward(ids_g)?;
        let pooled = g
            .pooled
            .ok_or_else(|| Error::Invalid("CLIP-G was loaded without its projection".into()))?;
        let embeds = Tensor::cat(
            &[
                l.penultimate.to_dtype(DType::F32)?,
                g.penultimate.to_dtype(DType::F32)?,
            ],
            2,
        )?;
        Ok((embeds, pooled.to_dtype(DType::F32)?))
    }
}

fn load_encoder(
    w: &Weights,
    layout: Layout,
    cfg: ClipTextConfig,
    pooling: Pooling,
    role: Role,
) -> Result<(ClipTextModel, Vec<(String, Tensor)>)> {
    let src = Source::new(w, layout, &cfg);
    let model = ClipTextModel::load(pooling, role, &src)?;
    Ok((model, src.take_loaded()))
}

/// `root/name/tokenizer.json`, or the embedded tokenizer with a note saying why.
fn folder_tokenizer(root: &Path, name: &str, notes: &mut Vec<String>) -> Result<ClipTokenizer> {
    let dir = root.join(name);
    let file = dir.join("tokenizer.json");
    if file.is_file() {
        return ClipTokenizer::load(&file);
    }
    let why = if !dir.is_dir() {
        format!("no {name}/ folder")
    } else if dir.join("vocab.json").is_file() {
        format!("{name}/ has vocab.json + merges.txt but no tokenizer.json (only tokenizer.json is read)")
    } else {
        format!("no {name}/tokenizer.json")
    };
    notes.push(format!("{why}: using the embedded CLIP tokenizer"));
    ClipTokenizer::embedded()
}

fn fingerprint(
    clip_l: &ClipTextModel,
    loaded_l: &[(String, Tensor)],
    clip_g: &ClipTextModel,
    loaded_g: &[(String, Tensor)],
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("qwenclip-teacher-v1;dtype={:?};", clip_l.dtype()).as_bytes());
    for (name, m, loaded) in [("clip_l", clip_l, loaded_l), ("clip_g", clip_g, loaded_g)] {
        let c = m.config();
        h.update(
            format!(
                "{name};act={};eps={:e};heads={};layers={};",
                m.activation().name(),
                c.layer_norm_eps,
                c.num_attention_heads,
                c.num_hidden_layers
            )
            .as_bytes(),
        );
        let mut sorted: Vec<&(String, Tensor)> = loaded.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (tname, t) in sorted {
            h.update(format!("{name}/{tname}{:?};", t.dims()).as_bytes());
            for v in sample(t)? {
                h.update(v.to_le_bytes());
            }
        }
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// [`FINGERPRINT_SAMPLE`] evenly spaced elements of `t` (all if fewer) as f32, gathered on
/// the tensor's device so only the sample is copied.
fn sample(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let flat = if n > FINGERPRINT_SAMPLE {
        let idx: Vec<u32> = (0..FINGERPRINT_SAMPLE)
            .map(|i| (i as u64 * n as u64 / FINGERPRINT_SAMPLE as u64) as u32)
            .collect();
        flat.index_select(&Tensor::from_vec(idx, FINGERPRINT_SAMPLE, t.device())?, 0)?
    } else {
        flat
    };
    Ok(flat.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
