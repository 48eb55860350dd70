//! Seeded SDXL-family UNets with random weights, for tests and benchmarks: the SDXL base
//! shape (2.57B parameters) and a tiny one. Same seed, same values, on every machine and
//! thread count (one generator per chunk of a tensor, seeded from the seed, the tensor's
//! index and the chunk's).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::formats::save_atomic;
use crate::rng::Rng;
use crate::unet::load::SINGLE_FILE_PREFIX;
use crate::unet::schema::{Layout, TensorSpec};
use crate::unet::{PerBlock, UNet, UNetConfig};

/// Named UNet shapes: `sdxl` (SDXL 1.0 base) and `tiny` (every SDXL feature at toy width:
/// three levels, two layers per block, transformer depth 2 in the last level and the mid
/// block, head widths 8 and 16, cross-attention width 24, pooled width 20).
pub fn unet_shape(name: &str) -> Result<UNetConfig> {
    match name {
        "sdxl" => Ok(UNetConfig::sdxl()),
        "tiny" => {
            let mut c = UNetConfig::sdxl();
            c.block_out_channels = vec![8, 16, 32];
            c.transformer_layers_per_block = PerBlock::Each(vec![1, 1, 2]);
            c.attention_head_dim = PerBlock::Each(vec![1, 2, 2]);
            c.cross_attention_dim = PerBlock::One(24);
            c.addition_time_embed_dim = Some(8);
            c.projection_class_embeddings_input_dim = Some(20 + 6 * 8);
            c.norm_num_groups = Some(4);
            Ok(c)
        }
        other => Err(Error::Invalid(format!(
            "unknown UNet shape \"{other}\" (sdxl, tiny)"
        ))),
    }
}

/// The tiny UNet at the widths of the tiny SDXL teacher (`write_tiny_teacher`: conditioning
/// 64 wide, pooled 16): a judge for vision distillation on the tiny models.
pub fn tiny_judge_shape() -> UNetConfig {
    let mut c = unet_shape("tiny").expect("a named shape");
    c.cross_attention_dim = PerBlock::One(64);
    c.projection_class_embeddings_input_dim = Some(16 + 6 * 8);
    c
}

/// Values per generator: large tensors are drawn in parallel chunks.
const CHUNK: usize = 1 << 20;

/// How a random weight is drawn: norms' weights around 1, biases small, matrices and
/// kernels at PyTorch's default scale (`1/sqrt(fan_in)`). Tensor `index` of the table.
fn draw(spec: &TensorSpec, index: usize, seed: u64) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    let norm = spec.name.contains("norm");
    let (std, mean) = match spec.shape.len() {
        1 if norm && spec.name.ends_with(".weight") => (0.1, 1.0),
        1 => (0.05, 0.0),
        _ => {
            let fan_in: usize = spec.shape[1..].iter().product();
            (1.0 / (fan_in as f64).sqrt(), 0.0)
        }
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, part)| {
        let key = ((index as u64) << 24) ^ c as u64;
        let mut rng = Rng::new(seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let draws = rng.normal_vec(part.len(), std);
        for (v, r) in part.iter_mut().zip(draws) {
            *v = r + mean;
        }
    });
    out
}

/// Every tensor of a random UNet for `cfg`, under its diffusers name, in f32 on the CPU.
pub fn random_unet_tensors(cfg: &UNetConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    cfg.validate().map_err(Error::Invalid)?;
    Layout::new(cfg)
        .tensors()
        .into_par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let t = Tensor::from_vec(draw(&spec, i, seed), spec.shape.as_slice(), &Device::Cpu)?;
            Ok((spec.name, t))
        })
        .collect()
}

/// A random UNet for `cfg` in memory.
pub fn random_unet(cfg: &UNetConfig, seed: u64, dtype: DType, device: &Device) -> Result<UNet> {
    UNet::from_tensors(cfg, &random_unet_tensors(cfg, seed)?, dtype, device)
}

/// The file layouts [`write_unet`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetFileLayout {
    /// A diffusers `unet/` folder: `config.json` + `diffusion_pytorch_model.safetensors`.
    Diffusers,
    /// One `.safetensors` file in the original layout under `model.diffusion_model.`.
    SingleFile,
}

/// Writes the random UNet of [`random_unet_tensors`] to `path` (a folder for
/// [`UNetFileLayout::Diffusers`], a file for [`UNetFileLayout::SingleFile`]) in `dtype`.
pub fn write_unet(
    cfg: &UNetConfig,
    path: &Path,
    layout: UNetFileLayout,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    let tensors = random_unet_tensors(cfg, seed)?;
    let ldm: HashMap<String, String> = Layout::new(cfg)
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.ldm))
        .collect();
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let key = match layout {
            UNetFileLayout::Diffusers => name,
            UNetFileLayout::SingleFile => format!("{SINGLE_FILE_PREFIX}{}", ldm[&name]),
        };
        out.insert(key, t.to_dtype(dtype)?);
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    match layout {
        UNetFileLayout::Diffusers => {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
            save_atomic(
                &out,
                Some(meta),
                &path.join("diffusion_pytorch_model.safetensors"),
            )?;
            let json = serde_json::to_vec_pretty(&cfg.to_json()).expect("config serialises");
            crate::formats::safetensors::write_atomic(&path.join("config.json"), &json)
        }
        UNetFileLayout::SingleFile => save_atomic(&out, Some(meta), path),
    }
}
