//! PyTorch `.pth` resamplers trained elsewhere: a zip-format pickle, optionally nested under
//! a key, renamed into our layout by a key map (see `docs/adapter-format.md`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{read_json, Error, Result};
use crate::resampler::{Resampler, ResamplerConfig};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyMap {
    #[serde(default)]
    pub nested_key: Option<String>,
    #[serde(default)]
    pub strip_prefixes: Vec<String>,
    #[serde(default)]
    pub rename: Vec<(String, String)>,
    /// Fields that tensor shapes cannot tell: `heads`, `norm_eps`.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl KeyMap {
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path, "key map")
    }

    pub fn apply(&self, key: &str) -> String {
        let mut k = key;
        if let Some(p) = self
            .strip_prefixes
            .iter()
            .find(|p| k.starts_with(p.as_str()))
        {
            k = &k[p.len()..];
        }
        let mut out = k.to_string();
        for (from, to) in &self.rename {
            out = out.replace(from, to);
        }
        out
    }
}

/// Reads the tensors of a zip-format `.pth`, renamed through `map`.
pub fn read_pth(path: &Path, map: &KeyMap) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path).map_err(|e| Error::io(path, e))?,
        &mut head,
    )
    .map_err(|_| Error::format(path, "not a .pth file (too short)"))?;
    if &head != b"PK\x03\x04" {
        return Err(Error::format(
            path,
            "not a zip-format .pth (legacy torch.save format or not a PyTorch file); re-save it with torch.save(obj, f) from PyTorch >= 1.6",
        ));
    }
    let pairs = candle_core::pickle::read_all_with_key(path, map.nested_key.as_deref())
        .map_err(|e| Error::format(path, format!("cannot read the pickled state dict: {e}")))?;
    if pairs.is_empty() {
        let under = map
            .nested_key
            .as_deref()
            .map_or(String::new(), |k| format!(" under key \"{k}\""));
        return Err(Error::format(path, format!("holds no tensors{under}")));
    }
    Ok(pairs.into_iter().map(|(k, t)| (map.apply(&k), t)).collect())
}

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
