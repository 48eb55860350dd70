//! The adapter bundle: PEFT LoRA + resampler + `qwenclip.json` (what base it fits, which
//! hidden layer, token limit, resampler config). Format in `docs/adapter-format.md`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::llm::Qwen3Config;
use crate::lora::Lora;
use crate::resampler::{Resampler, ResamplerConfig};

pub const MANIFEST_FILE: &str = "qwenclip.json";
pub const RESAMPLER_FILE: &str = "resampler.safetensors";
/// Where a folder that is not an adapter itself keeps one (a training run folder's layout):
/// such a folder is accepted wherever an adapter is.
pub const NESTED_DIR: &str = "adapter";
const FORMAT: &str = "qwenclip-adapter";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModelRef {
    pub name: String,
    pub fingerprint: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Human-readable shape, quoted when the adapter is put on a base it does not fit.
    #[serde(default)]
    pub shape: String,
}

impl BaseModelRef {
    pub fn of(name: &str, cfg: &Qwen3Config) -> Self {
        Self {
            name: name.to_string(),
            fingerprint: cfg.fingerprint(),
            hidden_size: cfg.hidden_size,
            num_hidden_layers: cfg.num_hidden_layers,
            shape: cfg.shape_summary(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    pub format: String,
    pub format_version: u32,
    pub base_model: BaseModelRef,
    pub hidden_layer: i32,
    pub max_tokens: usize,
    #[serde(default)]
    pub resampler: Option<ResamplerConfig>,
}

impl AdapterManifest {
    pub fn new(
        base: BaseModelRef,
        hidden_layer: i32,
        max_tokens: usize,
        resampler: Option<ResamplerConfig>,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            base_model: base,
            hidden_layer,
            max_tokens,
            resampler,
        }
    }
}

/// A loaded adapter: a full bundle, or a bare PEFT LoRA folder (no manifest, no resampler).
pub struct Adapter {
    pub dir: PathBuf,
    pub manifest: Option<AdapterManifest>,
    pub lora: Option<Lora>,
    pub resampler: Option<Resampler>,
}

/// Whether `dir` holds an adapter's own files (a manifest or a PEFT config).
fn is_bundle(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file() || Lora::present(dir)
}

impl Adapter {
    /// Loads the adapter in `dir`, or in `dir/adapter/` when `dir` is a training run folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(dir, "adapter folder not found"));
        }
        let nested = dir.join(NESTED_DIR);
        let dir = if !is_bundle(dir) && is_bundle(&nested) {
            nested.as_path()
        } else {
            dir
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest: Option<AdapterManifest> = if manifest_path.is_file() {
            let m: AdapterManifest = read_json(&manifest_path, "adapter manifest")?;
            if m.format != FORMAT || m.format_version > FORMAT_VERSION {
                return Err(Error::format(
                    &manifest_path,
                    format!(
                        "format \"{}\" version {} is not one this build reads ({FORMAT} <= {FORMAT_VERSION})",
                        m.format, m.format_version
                    ),
                ));
            }
            Some(m)
        } else {
            None
        };
        let lora = if Lora::present(dir) {
            Some(Lora::load(dir, device)?)
        } else {
            None
        };
        let resampler = match manifest.as_ref().and_then(|m| m.resampler.clone()) {
            Some(cfg) => Some(Resampler::load(
                &dir.join(RESAMPLER_FILE),
                Some(cfg),
                device,
            )?),
            None => None,
        };
        if manifest.is_none() && lora.is_none() {
            return Err(Error::format(
                dir,
                format!("neither an adapter bundle ({MANIFEST_FILE}) nor a PEFT LoRA (adapter_config.json)"),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            lora,
            resampler,
        })
    }

    /// Refuses a base model this adapter was not made for, naming both shapes.
    pub fn check_base(&self, cfg: &Qwen3Config) -> Result<()> {
        if let Some(m) = &self.manifest {
            if m.base_model.fingerprint != cfg.fingerprint() {
                return Err(Error::Mismatch(format!(
                    "{} was made for {} ({}), but the base model is {}",
                    self.dir.display(),
                    m.base_model.name,
                    m.base_model.shape,
                    cfg.shape_summary()
                )));
            }
            if let Some(r) = &m.resampler {
                if r.input_dim != cfg.hidden_size {
                    return Err(Error::Mismatch(format!(
                        "{}: the resampler takes width {} but the base model's hidden size is {}",
                        self.dir.display(),
                        r.input_dim,
                        cfg.hidden_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Writes the bundle; each file is replaced atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if let Some(lora) = &self.lora {
            lora.save(dir)?;
        }
        if let Some(r) = &self.resampler {
            r.save(&dir.join(RESAMPLER_FILE))?;
        }
        if let Some(m) = &self.manifest {
            let json = serde_json::to_vec_pretty(m).expect("manifest serialises");
            crate::formats::safetensors::write_atomic(&dir.join(MANIFEST_FILE), &json)?;
        }
        Ok(())
    }
}
