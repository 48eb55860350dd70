//! PEFT LoRA for Qwen3: `adapter_config.json` + `adapter_model.safetensors`, the linear layer
//! that applies it (unmerged for training, merged for inference), and saving in PEFT's layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::formats::{save_atomic, Weights};
use crate::llm::schema::Module;
use crate::ops::{self, ForwardMode, QMatrix};

/// PEFT's name of the model a LoRA wraps, before the base model's own tensor names.
const PEFT_ROOT: &str = "base_model.model.";

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The subset of PEFT's `LoraConfig` that changes the math; anything we cannot honour is
/// refused at load time rather than silently ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "lora_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: serde_json::Value,
    #[serde(default)]
    pub alpha_pattern: serde_json::Value,
    #[serde(default)]
    pub layers_to_transform: serde_json::Value,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "task_type")]
    pub task_type: Option<String>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn bias_none() -> String {
    "none".into()
}
fn task_type() -> Option<String> {
    None
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, targets: &[&str], base: Option<String>) -> Self {
        Self {
            peft_type: lora_type(),
            r,
            lora_alpha: alpha,
            target_modules: serde_json::json!(targets),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            bias: bias_none(),
            base_model_name_or_path: base,
            rank_pattern: serde_json::json!({}),
            alpha_pattern: serde_json::json!({}),
            layers_to_transform: serde_json::Value::Null,
            lora_dropout: 0.0,
            task_type: None,
        }
    }

    /// `s` in `y = W x + s B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Module names targeted, validated against what Qwen3 has.
    pub fn targets(&self) -> std::result::Result<Vec<String>, String> {
        let list = match &self.target_modules {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or("entries must be strings".to_string())
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            serde_json::Value::String(s) => {
                return Err(format!(
                "target_modules is the regular expression \"{s}\"; list the module names instead"
            ))
            }
            other => return Err(format!("target_modules must be a list, got {other}")),
        };
        for t in &list {
            if Module::from_name(t).is_none() {
                let all: Vec<&str> = Module::ALL.iter().map(|m| m.name()).collect();
                return Err(format!(
                    "target module \"{t}\" is not a Qwen3 projection (expected any of {})",
                    all.join(", ")
                ));
            }
        }
        Ok(list)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.peft_type != "LORA" {
            return Err(format!(
                "peft_type is \"{}\", expected \"LORA\"",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return Err("r must be > 0".into());
        }
        let unsupported = [
            (self.use_dora, "use_dora = true (DoRA)"),
            (self.fan_in_fan_out, "fan_in_fan_out = true"),
            (self.bias != "none", "bias other than \"none\""),
            (non_empty(&self.rank_pattern), "rank_pattern"),
            (non_empty(&self.alpha_pattern), "alpha_pattern"),
            (non_empty(&self.layers_to_transform), "layers_to_transform"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err(format!("{what} is not supported"));
        }
        self.targets().map(|_| ())
    }
}

fn non_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => false,
        serde_json::Value::Object(m) => !m.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// Where a LoRA pair sits: decoder layer and projection name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub module: String,
}

impl Site {
    /// The projection's path in the base model (`model.layers.3.self_attn.q_proj`): its
    /// weight is this plus `.weight`.
    pub fn module_path(&self) -> String {
        match Module::from_name(&self.module) {
            Some(m) => m.path(self.layer),
            // Unknown modules are refused before a site is used; this only names one.
            None => format!("model.layers.{}.{}", self.layer, self.module),
        }
    }

    /// PEFT's tensor name prefix for this site (without `.lora_A.weight`).
    pub fn peft_prefix(&self) -> String {
        format!("{PEFT_ROOT}{}", self.module_path())
    }

    fn parse(name: &str) -> Option<(Site, char)> {
        let rest = name.strip_prefix(PEFT_ROOT)?;
        let (path, which) = [("lora_A", 'A'), ("lora_B", 'B')]
            .into_iter()
            .find_map(|(half, c)| Some((rest.strip_suffix(&format!(".{half}.weight"))?, c)))?;
        let (layer, m) = Module::parse_path(path)?;
        Some((
            Site {
                layer,
                module: m.name().to_string(),
            },
            which,
        ))
    }
}

/// One LoRA pair: `a` is `[r, in]`, `b` is `[out, r]`.
#[derive(Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A loaded LoRA: its config and one pair per targeted site.
#[derive(Clone)]
pub struct Lora {
    pub config: LoraConfig,
    pub pairs: BTreeMap<Site, LoraPair>,
}

impl Lora {
    /// True when `dir` holds a PEFT LoRA.
    pub fn present(dir: &Path) -> bool {
        dir.join(CONFIG_FILE).is_file()
    }

    /// Loads a PEFT LoRA folder. Tensors are kept in f32 (they are small, and training
    /// needs f32 anyway).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::format(
                dir,
                format!("no {CONFIG_FILE} in this folder"),
            ));
        }
        let config: LoraConfig = read_json(&cfg_path, "PEFT adapter_config.json")?;
        config.validate().map_err(|m| Error::format(&cfg_path, m))?;
        let w_path = dir.join(WEIGHTS_FILE);
        let weights = Weights::open(std::slice::from_ref(&w_path), &w_path, DType::F32, device)?;
        let mut halves: HashMap<Site, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for name in weights.names() {
            let (site, which) = Site::parse(&name).ok_or_else(|| {
                Error::format(
                    &w_path,
                    format!("tensor `{name}` is not a Qwen3 LoRA tensor in PEFT naming (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight ...)"),
                )
            })?;
            let shape = weights.shape_of(&name)?;
            let t = weights.get(&name, &shape)?;
            if shape.len() != 2 {
                return Err(Error::format(
                    &w_path,
                    format!("tensor `{name}` has rank {}, expected 2", shape.len()),
                ));
            }
            let rank_dim = if which == 'A' { shape[0] } else { shape[1] };
            if rank_dim != config.r {
                return Err(Error::format(
                    &w_path,
                    format!(
                        "tensor `{name}` has shape {shape:?} but r = {} in {CONFIG_FILE}",
                        config.r
                    ),
                ));
            }
            let slot = halves.entry(site).or_default();
            if which == 'A' {
                slot.0 = Some(t)
            } else {
                slot.1 = Some(t)
            }
        }
        let mut pairs = BTreeMap::new();
        for (site, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    pairs.insert(site, LoraPair { a, b });
                }
                _ => {
                    return Err(Error::format(
                        &w_path,
                        format!("{} has only one of lora_A / lora_B", site.peft_prefix()),
                    ))
                }
            }
        }
        if pairs.is_empty() {
            return Err(Error::format(&w_path, "holds no LoRA tensors"));
        }
        Ok(Self { config, pairs })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (site, pair) in &self.pairs {
            let p = site.peft_prefix();
            tensors.insert(format!("{p}.lora_A.weight"), pair.a.to_dtype(DType::F32)?);
            tensors.insert(format!("{p}.lora_B.weight"), pair.b.to_dtype(DType::F32)?);
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        save_atomic(&tensors, Some(meta), &dir.join(WEIGHTS_FILE))?;
        let json = serde_json::to_vec_pretty(&self.config)
            .map_err(|e| Error::format(dir.join(CONFIG_FILE), e.to_string()))?;
        crate::formats::safetensors::write_atomic(&dir.join(CONFIG_FILE), &json)
    }
}

/// A frozen linear layer (no bias: Qwen3 has none) with an optional unmerged LoRA.
#[derive(Clone)]
pub struct LoraLinear {
    /// `[out, in]`, possibly with a LoRA merged in.
    pub weight: Tensor,
    pub lora: Option<(LoraPair, f64)>,
}

impl LoraLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight, lora: None }
    }

    pub fn out_in(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    pub fn forward(&self, x: &Tensor, path: ForwardMode) -> candle_core::Result<Tensor> {
        if let (ForwardMode::Differentiable, Some((pair, s))) = (path, &self.lora) {
            if let Some(y) = ops::frozen_linear_lora(x, &self.weight, (&pair.a, &pair.b, *s))? {
                return Ok(y);
            }
        }
        let y = match path {
            ForwardMode::Fast => ops::matmul_t(x, &self.weight)?,
            ForwardMode::Differentiable => ops::frozen_linear(x, &self.weight)?,
        };
        add_lora(x, y, self.lora.as_ref())
    }

    /// `W + s B A`, computed in f32 and cast back to the weight's dtype.
    pub fn merged_weight(&self, pair: &LoraPair, scale: f64) -> candle_core::Result<Tensor> {
        let delta = (pair
            .b
            .to_dtype(DType::F32)?
            .matmul(&pair.a.to_dtype(DType::F32)?)?
            * scale)?;
        let dt = self.weight.dtype();
        (self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dt)
    }
}

/// `y + s B (A x)` (or `y` without a LoRA).
fn add_lora(x: &Tensor, y: Tensor, lora: Option<&(LoraPair, f64)>) -> candle_core::Result<Tensor> {
    match lora {
        None => Ok(y),
        Some((pair, scale)) => {
            let dt = x.dtype();
            let h = ops::matmul_t(x, &pair.a.to_dtype(dt)?)?;
            let d = ops::matmul_t(&h, &pair.b.to_dtype(dt)?)?;
            y + (d * *scale)?
        }
    }
}

/// A frozen quantized linear layer (GGUF base) with an optional LoRA, which is always kept
/// unmerged: folding `sBA` into 4-bit blocks would re-quantize the sum and lose most of the
/// LoRA's effect (its entries are far smaller than a Q4 step).
#[derive(Clone)]
pub struct QLoraLinear {
    pub weight: Arc<QMatrix>,
    pub lora: Option<(LoraPair, f64)>,
}

impl QLoraLinear {
    pub fn forward(&self, x: &Tensor, path: ForwardMode) -> candle_core::Result<Tensor> {
        let y = ops::quantized_linear(x, &self.weight, path)?;
        add_lora(x, y, self.lora.as_ref())
    }
}

/// A decoder projection: dense (safetensors, or a float tensor in a GGUF) or quantized.
#[derive(Clone)]
pub enum Projection {
    Dense(LoraLinear),
    Quantized(QLoraLinear),
}

impl Projection {
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(LoraLinear::new(weight))
    }

    pub fn quantized(weight: Arc<QMatrix>) -> Self {
        Self::Quantized(QLoraLinear { weight, lora: None })
    }

    pub fn forward(&self, x: &Tensor, path: ForwardMode) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x, path),
            Self::Quantized(l) => l.forward(x, path),
        }
    }

    /// `(out, in)`.
    pub fn out_in(&self) -> (usize, usize) {
        match self {
            Self::Dense(l) => l.out_in(),
            Self::Quantized(l) => l.weight.dims(),
        }
    }

    pub fn lora(&self) -> Option<&(LoraPair, f64)> {
        match self {
            Self::Dense(l) => l.lora.as_ref(),
            Self::Quantized(l) => l.lora.as_ref(),
        }
    }

    pub fn set_lora(&mut self, lora: Option<(LoraPair, f64)>) {
        match self {
            Self::Dense(l) => l.lora = lora,
            Self::Quantized(l) => l.lora = lora,
        }
    }

    /// Bytes of the frozen weight (quantized blocks, or the dense tensor) plus any LoRA.
    pub fn weight_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lora = self.lora().map_or(0, |(p, _)| size(&p.a) + size(&p.b));
        lora + match self {
            Self::Dense(l) => size(&l.weight),
            Self::Quantized(l) => l.weight.storage_bytes(),
        }
    }
}
