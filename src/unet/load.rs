//! Where the UNet's weights come from: a diffusers `unet/` folder (`config.json` and
//! `diffusion_pytorch_model.safetensors`, sharded with a `.safetensors.index.json`, or the
//! `.fp16.`/`.bf16.` variant files; f32, f16 or bf16 tensors), a pipeline folder holding
//! one, or a single-file SDXL checkpoint (the LDM/SGM layout under `model.diffusion_model.`,
//! config read off the tensor shapes and SDXL's known structure).
//!
//! The model asks for tensors by diffusers name through a [`Source`], which reads each one
//! under its name in the file's layout ([`super::schema`]) and checks its shape. Errors name
//! the file and the tensor; a UNet of another family (SD 1.x/2.x, the SDXL refiner, SD3,
//! Flux) is named as such.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{PerBlock, UNetConfig, DOWN_CROSS, DOWN_PLAIN, UP_CROSS, UP_PLAIN};
use super::schema::{Layout, Site, TensorSpec};
use crate::error::{Error, Result};
use crate::formats::safetensors::{count_numbered, shard_files};
use crate::formats::Weights;

/// Prefix of the UNet in a single-file SDXL checkpoint.
pub const SINGLE_FILE_PREFIX: &str = "model.diffusion_model.";
/// SDXL's attention head width (`num_head_channels: 64` in its LDM config): single files do
/// not record the head count.
pub const SDXL_HEAD_DIM: usize = 64;
/// SDXL's `addition_time_embed_dim`: the size ids' sinusoidal width (not visible in a single
/// file, whose `label_emb` only shows pooled width + 6 x this).
pub const SDXL_ADDITION_TIME_EMBED_DIM: usize = 256;

/// Reads one tensor of the table.
type Fetch<'a> = dyn Fn(&TensorSpec) -> Result<Tensor> + 'a;

/// The tensors of a model, asked for by diffusers name.
pub(crate) struct Source<'a> {
    table: HashMap<String, TensorSpec>,
    fetch: Box<Fetch<'a>>,
}

impl<'a> Source<'a> {
    pub fn new(layout: &Layout, fetch: impl Fn(&TensorSpec) -> Result<Tensor> + 'a) -> Self {
        Self {
            table: layout
                .tensors()
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
            fetch: Box::new(fetch),
        }
    }

    /// The tensor `{site}.{field}` (diffusers name).
    pub fn get(&self, site: &Site, field: &str) -> Result<Tensor> {
        let name = format!("{}.{field}", site.diffusers);
        let spec = self.table.get(&name).ok_or_else(|| {
            Error::Invalid(format!("UNet tensor `{name}` is not in the schema (a bug)"))
        })?;
        (self.fetch)(spec)
    }
}

/// Which layout a UNet was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UNetOrigin {
    /// A diffusers `unet/` folder.
    Diffusers(PathBuf),
    /// A single-file checkpoint (LDM layout, under `prefix`).
    SingleFile { path: PathBuf, prefix: String },
    /// Built in memory (the generators).
    Memory,
}

/// An opened weight set and how to read the model's tensors from it.
pub(crate) struct Opened {
    pub weights: Weights,
    pub config: UNetConfig,
    pub origin: UNetOrigin,
}

impl Opened {
    /// Reads `spec` in this origin's layout, shape-checked.
    pub fn fetch(&self, spec: &TensorSpec) -> Result<Tensor> {
        match &self.origin {
            UNetOrigin::SingleFile { prefix, .. } => self
                .weights
                .get(&format!("{prefix}{}", spec.ldm), &spec.shape),
            _ => self.weights.get(&spec.name, &spec.shape),
        }
    }
}

/// Opens `path`: a diffusers `unet/` folder, a pipeline folder with `unet/`, or a
/// single-file checkpoint (`config` overrides the config inferred from its shapes; a folder
/// always uses its own `config.json`).
pub(crate) fn open(
    path: &Path,
    config: Option<&UNetConfig>,
    dtype: DType,
    device: &Device,
) -> Result<Opened> {
    if path.is_dir() {
        let dir = if path.join("config.json").is_file() || !path.join("unet").is_dir() {
            path.to_path_buf()
        } else {
            path.join("unet")
        };
        return open_folder(&dir, dtype, device);
    }
    if !path.is_file() {
        return Err(Error::format(path, "no such file or folder"));
    }
    let weights = Weights::open(&[path.to_path_buf()], path, dtype, device)?;
    let prefix = single_file_prefix(path, &weights.names())?;
    let config = match config {
        Some(c) => {
            c.validate().map_err(|msg| Error::format(path, msg))?;
            c.clone()
        }
        None => infer_config(path, &weights.names(), &|n| weights.shape_of(n), &prefix)?,
    };
    Ok(Opened {
        weights,
        config,
        origin: UNetOrigin::SingleFile {
            path: path.to_path_buf(),
            prefix,
        },
    })
}

/// The weight files of a diffusers component folder, best first: plain, then the `fp16` and
/// `bf16` variants; each as one file or an index of shards.
fn folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const STEM: &str = "diffusion_pytorch_model";
    for variant in ["", ".fp16", ".bf16"] {
        let single = dir.join(format!("{STEM}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{STEM}{variant}.safetensors.index.json"));
        if index.is_file() {
            return shard_files(&index);
        }
    }
    let hint = if dir.join(format!("{STEM}.bin")).is_file() {
        " (only the pickled .bin: convert it to safetensors)"
    } else {
        ""
    };
    Err(Error::format(
        dir,
        format!("no {STEM}.safetensors, {STEM}.safetensors.index.json or their .fp16/.bf16 variants in this folder{hint}"),
    ))
}

fn open_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Opened> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        let hint = if dir.join("transformer").is_dir() {
            " (it has transformer/: an SD3 or Flux pipeline, not an SDXL UNet)"
        } else {
            ""
        };
        return Err(Error::format(
            dir,
            format!("no config.json and no unet/ folder: not a diffusers UNet folder{hint}"),
        ));
    }
    let config = UNetConfig::from_file(&cfg_path)?;
    let files = folder_files(dir)?;
    let weights = Weights::open(&files, dir, dtype, device)?;
    Ok(Opened {
        weights,
        config,
        origin: UNetOrigin::Diffusers(dir.to_path_buf()),
    })
}

/// The prefix of the LDM UNet in a single file, or an error naming what the file holds.
fn single_file_prefix(path: &Path, names: &[String]) -> Result<String> {
    let has = |p: &str| names.iter().any(|n| n.starts_with(p));
    let contains = |p: &str| names.iter().any(|n| n.contains(p));
    for prefix in [SINGLE_FILE_PREFIX, ""] {
        if has(&format!("{prefix}input_blocks.0.0.weight")) {
            return Ok(prefix.to_string());
        }
    }
    let what = if contains("joint_blocks.") {
        "an SD3 MMDiT checkpoint (`joint_blocks.*`)"
    } else if contains("double_blocks.") || contains("single_blocks.") {
        "a Flux checkpoint (`double_blocks.*`/`single_blocks.*`)"
    } else if has("down_blocks.") && has("conv_in.weight") {
        "a diffusers-layout UNet without its config: pass the folder that holds it and its config.json"
    } else if has("cond_stage_model.") || has("first_stage_model.") {
        "a checkpoint without a UNet"
    } else {
        "no UNet tensors"
    };
    Err(Error::format(
        path,
        format!("not a single-file SDXL checkpoint: no `{SINGLE_FILE_PREFIX}input_blocks.*` tensors ({what})"),
    ))
}

/// One LDM level read off the names: resnet output channels and transformer depth per layer.
struct Level {
    channels: Vec<usize>,
    depths: Vec<usize>,
}

/// An SDXL-family config read off a single file's shapes (see [`SDXL_HEAD_DIM`],
/// [`SDXL_ADDITION_TIME_EMBED_DIM`]; group norms 32 groups, eps 1e-5, `flip_sin_to_cos`,
/// no frequency shift, as SDXL).
/// `names` are the file's tensors, `shape` reads one's shape, `p` is the UNet's prefix.
pub fn infer_config(
    path: &Path,
    names: &[String],
    shape: &dyn Fn(&str) -> Result<Vec<usize>>,
    p: &str,
) -> Result<UNetConfig> {
    let path = path.to_path_buf();
    let set: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let has = |n: &str| set.contains(format!("{p}{n}").as_str());
    let conv_in = shape(&format!("{p}input_blocks.0.0.weight"))?;
    let [c0, in_channels, k_in, _] = conv_in[..] else {
        return Err(Error::format(
            &path,
            format!("`{p}input_blocks.0.0.weight` has shape {conv_in:?}, expected 4 dimensions"),
        ));
    };
    let context_dim = names
        .iter()
        .find(|n| n.starts_with(p) && n.ends_with("attn2.to_k.weight"))
        .map(|n| shape(n).map(|s| s.get(1).copied().unwrap_or(0)))
        .transpose()?;
    if !has("label_emb.0.0.weight") {
        let family = match context_dim {
            Some(768) => " (cross-attention width 768: an SD 1.x UNet)",
            Some(1024) => " (cross-attention width 1024: an SD 2.x UNet)",
            _ => "",
        };
        return Err(Error::format(
            &path,
            format!("no `{p}label_emb.0.0.weight` (SDXL's add_embedding of the pooled text embedding and size ids): not an SDXL-family UNet{family}"),
        ));
    }
    let label = shape(&format!("{p}label_emb.0.0.weight"))?;
    let temb = shape(&format!("{p}time_embed.0.weight"))?[0];
    let out = shape(&format!("{p}out.2.weight"))?;
    let context_dim = context_dim.ok_or_else(|| {
        Error::format(
            &path,
            "no cross-attention (`attn2.to_k.weight`) tensors: not an SDXL UNet",
        )
    })?;
    if context_dim == 1280 && label.get(1) == Some(&2560) {
        return Err(Error::format(
            &path,
            "an SDXL refiner UNet (cross-attention width 1280, 5 size ids): only SDXL base-shaped UNets are supported",
        ));
    }
    // The down path: resnets (`.0.in_layers`), attentions (`.1.transformer_blocks`),
    // downsamplers (`.0.op`) that end a level.
    let mut levels = vec![Level {
        channels: vec![],
        depths: vec![],
    }];
    let mut linear_projection = None;
    for i in 1.. {
        let b = format!("input_blocks.{i}");
        if has(&format!("{b}.0.op.weight")) {
            levels.push(Level {
                channels: vec![],
                depths: vec![],
            });
        } else if has(&format!("{b}.0.in_layers.0.weight")) {
            let level = levels.last_mut().expect("one level at least");
            level
                .channels
                .push(shape(&format!("{p}{b}.0.out_layers.3.weight"))?[0]);
            level.depths.push(count_numbered(
                names,
                &format!("{p}{b}.1.transformer_blocks."),
            ));
            if has(&format!("{b}.1.proj_in.weight")) {
                linear_projection = Some(shape(&format!("{p}{b}.1.proj_in.weight"))?.len() == 2);
            }
        } else {
            break;
        }
    }
    let bad = |msg: String| {
        Error::format(
            &path,
            format!("cannot read an SDXL UNet's structure off this file: {msg} (pass the UNet's config.json)"),
        )
    };
    if levels.iter().any(|l| l.channels.is_empty()) {
        return Err(bad("a level without resnets".into()));
    }
    let mut block_out_channels = vec![];
    let mut layers = vec![];
    let mut depths = vec![];
    let mut heads = vec![];
    for (i, l) in levels.iter().enumerate() {
        let c = l.channels[0];
        if l.channels.iter().any(|&x| x != c) || l.depths.iter().any(|&d| d != l.depths[0]) {
            return Err(bad(format!(
                "level {i} mixes resnet widths or transformer depths"
            )));
        }
        block_out_channels.push(c);
        layers.push(l.channels.len());
        depths.push(l.depths[0]);
        if l.depths[0] > 0 && !c.is_multiple_of(SDXL_HEAD_DIM) {
            return Err(bad(format!(
                "level {i} has {c} channels, not a multiple of SDXL's head width {SDXL_HEAD_DIM}"
            )));
        }
        heads.push((c / SDXL_HEAD_DIM).max(1));
    }
    let mid_depth = count_numbered(names, &format!("{p}middle_block.1.transformer_blocks."));
    if mid_depth != *depths.last().expect("levels") {
        return Err(bad(format!(
            "the mid block has {mid_depth} transformer blocks, the last level {}",
            depths.last().expect("levels")
        )));
    }
    let n = levels.len();
    // Up path: level n-1-i's layers + 1 resnets each, same depths.
    let mut ob = 0;
    for i in 0..n {
        let level = n - 1 - i;
        for _ in 0..layers[level] + 1 {
            let d = count_numbered(
                names,
                &format!("{p}output_blocks.{ob}.1.transformer_blocks."),
            );
            if d != depths[level] {
                return Err(bad(format!(
                    "output block {ob} has {d} transformer blocks, its input level {}",
                    depths[level]
                )));
            }
            ob += 1;
        }
    }
    let same = |v: &Vec<usize>| {
        if v.iter().all(|&x| x == v[0]) {
            PerBlock::One(v[0])
        } else {
            PerBlock::Each(v.clone())
        }
    };
    let mut cfg = UNetConfig::sdxl();
    cfg.in_channels = in_channels;
    cfg.out_channels = out[0];
    cfg.conv_in_kernel = k_in;
    cfg.conv_out_kernel = out.get(2).copied().unwrap_or(3);
    cfg.down_block_types = depths
        .iter()
        .map(|&d| if d > 0 { DOWN_CROSS } else { DOWN_PLAIN }.to_string())
        .collect();
    cfg.up_block_types = depths
        .iter()
        .rev()
        .map(|&d| if d > 0 { UP_CROSS } else { UP_PLAIN }.to_string())
        .collect();
    cfg.block_out_channels = block_out_channels;
    cfg.layers_per_block = same(&layers);
    cfg.transformer_layers_per_block = same(&depths.iter().map(|&d| d.max(1)).collect());
    cfg.attention_head_dim = PerBlock::Each(heads);
    cfg.cross_attention_dim = PerBlock::One(context_dim);
    cfg.use_linear_projection = linear_projection.unwrap_or(true);
    cfg.projection_class_embeddings_input_dim = label.get(1).copied();
    cfg.addition_time_embed_dim = Some(SDXL_ADDITION_TIME_EMBED_DIM);
    cfg.time_embedding_dim = (temb != 4 * c0).then_some(temb);
    cfg.validate()
        .map_err(|msg| bad(format!("{msg} (pass the UNet's config.json)")))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LDM names and shapes of `cfg` as a single file would hold them.
    fn ldm_file(cfg: &UNetConfig) -> HashMap<String, Vec<usize>> {
        Layout::new(cfg)
            .tensors()
            .into_iter()
            .map(|t| (format!("{SINGLE_FILE_PREFIX}{}", t.ldm), t.shape))
            .collect()
    }

    fn infer(file: &HashMap<String, Vec<usize>>) -> Result<UNetConfig> {
        let names: Vec<String> = file.keys().cloned().collect();
        let shape = |n: &str| -> Result<Vec<usize>> {
            file.get(n).cloned().ok_or_else(|| Error::MissingTensor {
                path: "sdxl.safetensors".into(),
                name: n.into(),
            })
        };
        infer_config(
            Path::new("sdxl.safetensors"),
            &names,
            &shape,
            SINGLE_FILE_PREFIX,
        )
    }

    #[test]
    fn sdxl_config_is_read_off_its_single_file_shapes() {
        let sdxl = UNetConfig::sdxl();
        let got = infer(&ldm_file(&sdxl)).unwrap();
        assert_eq!(got, sdxl);
    }

    #[test]
    fn a_single_file_without_add_embedding_is_named_sd1() {
        let mut sd1 = UNetConfig::sdxl();
        sd1.cross_attention_dim = PerBlock::One(768);
        let mut file = ldm_file(&sd1);
        file.retain(|k, _| !k.contains("label_emb"));
        let err = infer(&file).unwrap_err().to_string();
        assert!(err.contains("label_emb") && err.contains("SD 1.x"), "{err}");
    }
}
