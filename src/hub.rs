//! Finding a base model: a local folder or `.gguf` file as is, or a Hugging Face hub id through hf-hub's
//! cache (honours `HF_HOME`, and `HF_HUB_OFFLINE=1` to never touch the network).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files an encoder needs besides the weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];

/// A local folder or `.gguf` file is returned untouched (no network); anything else must look
/// like a hub id (`org/name`) and is fetched into, or read from, the hf-hub cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.exists() {
        if local.is_file() && crate::formats::gguf::is_gguf(local) {
            return Ok(local.to_path_buf());
        }
        if !local.is_dir() {
            return Err(Error::format(
                local,
                "expected a model folder (config.json, tokenizer.json, *.safetensors) or a .gguf file",
            ));
        }
        return Ok(local.to_path_buf());
    }
    if crate::formats::gguf::is_gguf(local) {
        return Err(Error::format(local, "no such .gguf file"));
    }
    let is_hub_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
    if !is_hub_id {
        return Err(Error::format(
            local,
            "no such folder (and not a hub id like Qwen/Qwen3-4B)",
        ));
    }
    let cache = hf_hub::Cache::from_env();
    let cached = fetch_with(spec, |file| {
        cache
            .model(spec.to_string())
            .get(file)
            .ok_or_else(|| format!("{file} is not in the cache"))
    });
    if cached.is_ok() || offline() {
        return cached.map_err(|e| not_available(spec, &cache, e));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| Error::Hub(format!("cannot start the hub client: {e}")))?;
    let repo = api.model(spec.to_string());
    fetch_with(spec, |file| {
        repo.get(file).map_err(|e| format!("{file}: {e}"))
    })
    .map_err(|e| not_available(spec, &cache, e))
}

/// What to do about a hub model that is neither cached nor downloadable here.
fn not_available(spec: &str, cache: &hf_hub::Cache, cause: Error) -> Error {
    let why = match cause {
        Error::Hub(m) => m,
        other => other.to_string(),
    };
    let how = if offline() {
        "HF_HUB_OFFLINE is set, so nothing is downloaded"
    } else {
        "the download failed"
    };
    Error::Hub(format!(
        "{spec} is not in the Hugging Face cache ({}) and {how} ({why}). On a machine with network, `huggingface-cli download {spec}` fills that cache (copy it here), or give the path of a local model folder (config.json, tokenizer.json, *.safetensors) or a .gguf file",
        cache.path().display()
    ))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

/// Fetches config, tokenizer and weights (sharded or single) with `get`, returning the
/// snapshot folder that holds them.
fn fetch_with(
    spec: &str,
    get: impl Fn(&str) -> std::result::Result<PathBuf, String>,
) -> Result<PathBuf> {
    let err = |m: String| Error::Hub(format!("{spec}: {m}"));
    let mut dir = None;
    for f in REQUIRED {
        dir = get(f).map_err(err)?.parent().map(Path::to_path_buf);
    }
    let dir = dir.expect("REQUIRED is not empty");
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("invalid shard index: {e}")))?;
            let mut shards: Vec<String> = parsed["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s).map_err(err)?;
            }
        }
        Err(_) => {
            get("model.safetensors").map_err(err)?;
        }
    }
    Ok(dir)
}
