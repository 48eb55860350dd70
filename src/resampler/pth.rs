//! Resamplers trained elsewhere, from a PyTorch `.pth` renamed by a key map: the config is
//! read off the tensor shapes, plus what the key map says for what shapes cannot tell.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Resampler, ResamplerConfig};
use crate::error::{Error, Result};
use crate::formats::pth::{read_pth, KeyMap};

/// Imports a resampler from a `.pth`, reading its config off the tensor shapes.
pub fn load_resampler(path: &Path, map: &KeyMap, device: &Device) -> Result<Resampler> {
    let tensors: HashMap<String, Tensor> = read_pth(path, map)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<_>>()?;
    let cfg = infer_config(&tensors, map).map_err(|m| Error::format(path, m))?;
    Resampler::from_tensors(cfg, tensors, path)
}

fn infer_config(
    t: &HashMap<String, Tensor>,
    map: &KeyMap,
) -> std::result::Result<ResamplerConfig, String> {
    let dims = |name: &str| -> std::result::Result<Vec<usize>, String> {
        t.get(name).map(|x| x.dims().to_vec()).ok_or_else(|| {
            format!(
                "tensor `{name}` not found after applying the key map (keys seen: {})",
                sample_keys(t)
            )
        })
    };
    let proj_in = dims("proj_in.weight")?;
    let latents = dims("latents")?;
    let fc1 = dims("layers.0.ff.fc1.weight")?;
    let layers = (0..)
        .take_while(|i| t.contains_key(&format!("layers.{i}.attn.to_q.weight")))
        .count();
    let width = proj_in[0];
    let mut cfg = ResamplerConfig {
        input_dim: proj_in[1],
        width,
        ff_mult: fc1[0] / width,
        layers,
        num_latents: latents[0],
        output_dim: dims("proj_out.weight")?[0],
        pooled_dim: dims("pooled_proj.weight")?[0],
        ..ResamplerConfig::for_input(proj_in[1])
    };
    if let Some(h) = map.config.get("heads") {
        cfg.heads = h
            .as_u64()
            .ok_or("key map config.heads must be an integer")? as usize;
    }
    if let Some(e) = map.config.get("norm_eps") {
        cfg.norm_eps = e
            .as_f64()
            .ok_or("key map config.norm_eps must be a number")?;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn sample_keys(t: &HashMap<String, Tensor>) -> String {
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    let shown: Vec<&str> = keys.iter().take(5).map(|s| s.as_str()).collect();
    format!(
        "{}{}",
        shown.join(", "),
        if keys.len() > 5 { ", ..." } else { "" }
    )
}
