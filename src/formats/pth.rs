//! PyTorch `.pth` state dicts: a zip-format pickle, optionally nested under a key, renamed
//! into our layout by a key map (see `docs/adapter-format.md`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

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
