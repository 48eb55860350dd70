//! Seeded generators for models that cannot be downloaded here: a tiny Qwen3 + adapter for
//! tests and the smoke run, and real-size shapes with random weights for benchmarks.
//! Same seed, same bytes, on every machine (see [`crate::rng`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{Adapter, AdapterManifest, BaseModelRef};
use crate::error::{Error, Result};
use crate::formats::save_atomic;
use crate::llm::quantize::{GgufBuilder, QuantizeSpec};
use crate::llm::schema::{Group, Param, TensorSpec};
use crate::llm::Qwen3Config;
use crate::lora::{Lora, LoraConfig, LoraPair, Site};
use crate::resampler::{Resampler, ResamplerConfig};
use crate::rng::Rng;
use crate::teacher::schema::{self as clip_schema, Field, Param as ClipParam};
use crate::teacher::ClipTextConfig;

pub mod unet;

/// Named architectures: `tiny` for tests, the others shaped like the released models.
pub fn shape(name: &str) -> Result<Qwen3Config> {
    let (hidden, layers, heads, kv, head_dim, ffn) = match name {
        "tiny" => (32, 2, 4, 2, 16, 64),
        // The smallest shape whose every row is a whole number of 256-value K-quant blocks.
        "tiny256" => (256, 2, 4, 2, 64, 512),
        "qwen3-0.6b" => (1024, 28, 16, 8, 128, 3072),
        "qwen3-1.7b" => (2048, 28, 16, 8, 128, 6144),
        "qwen3-4b" => (2560, 36, 32, 8, 128, 9728),
        other => {
            return Err(Error::Invalid(format!(
                "unknown shape \"{other}\" (tiny, tiny256, qwen3-0.6b, qwen3-1.7b, qwen3-4b)"
            )))
        }
    };
    Ok(Qwen3Config {
        model_type: Some("qwen3".into()),
        vocab_size: 151_936,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: Some(head_dim),
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: Some(40_960),
    })
}

/// `prod(shape)` draws from N(mean, std^2), in the generators' fixed order.
fn normal_around(rng: &mut Rng, shape: &[usize], std: f64, mean: f32) -> Vec<f32> {
    let n = shape.iter().product();
    rng.normal_vec(n, std)
        .into_iter()
        .map(|x| x + mean)
        .collect()
}

/// Every tensor of a random Qwen3 for `cfg`, in schema order, with f32 values: the same
/// seed gives the same weights in every format. Matrices are drawn at PyTorch's default
/// scale (`1/sqrt(in)`), norms around 1.
fn random_tensors(
    cfg: &Qwen3Config,
    seed: u64,
    mut emit: impl FnMut(TensorSpec, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    for t in cfg.tensors() {
        let (std, mean) = match t.param {
            Param::Embedding => (0.02, 0.0),
            p if p.group() == Group::Norms => (0.1, 1.0),
            _ => (1.0 / (t.shape[1] as f64).sqrt(), 0.0),
        };
        let data = normal_around(&mut rng, &t.shape, std, mean);
        emit(t, data)?;
    }
    Ok(())
}

/// Writes a Qwen3 with random weights in Hugging Face layout (`config.json`,
/// `model.safetensors`, and `tokenizer.json` holding `tokenizer`, the bytes of a Qwen
/// `tokenizer.json` such as [`super::QWEN_TOKENIZER`]).
pub fn write_model(
    cfg: &Qwen3Config,
    dir: &Path,
    tokenizer: &[u8],
    dtype: DType,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    random_tensors(cfg, seed, |t, data| {
        let value = Tensor::from_vec(data, t.shape, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(t.hf_name, value);
        Ok(())
    })?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_atomic(&tensors, Some(meta), &dir.join("model.safetensors"))?;
    let mut config = serde_json::to_value(cfg).expect("config serialises");
    config["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    config["torch_dtype"] = serde_json::json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    config["hidden_act"] = serde_json::json!("silu");
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    crate::formats::safetensors::write_atomic(&dir.join("config.json"), &json)?;
    crate::formats::safetensors::write_atomic(&dir.join("tokenizer.json"), tokenizer)
}

/// Writes the same random Qwen3 as [`write_model`] (same seed, same weights) straight into
/// one GGUF file, quantized as `spec` says, with `tokenizer` (the bytes of a Qwen
/// `tokenizer.json`) embedded. Each tensor is
/// quantized as it is generated, so a Qwen3-4B shape never exists in f32 (peak memory is the
/// quantized model plus one f32 tensor).
pub fn write_gguf_model(
    cfg: &Qwen3Config,
    out: &Path,
    tokenizer: Option<&[u8]>,
    spec: QuantizeSpec,
    seed: u64,
) -> Result<()> {
    let mut b = GgufBuilder::new(spec);
    random_tensors(cfg, seed, |t, data| {
        b.add(
            &t.gguf_name,
            &Tensor::from_vec(data, t.shape, &Device::Cpu)?,
        )
    })?;
    let name = out.file_stem().map_or("qwen3-random".to_string(), |n| {
        n.to_string_lossy().into_owned()
    });
    let tokenizer = tokenizer.map(|json| {
        crate::tokenizer::gguf::metadata_of(json, Path::new("tokenizer.json"), cfg.vocab_size)
    });
    b.write(out, cfg, &name, tokenizer)?;
    Ok(())
}

/// An adapter for `cfg` with random, non-zero LoRA (q/k/v/o) and a small resampler.
pub fn make_adapter(
    cfg: &Qwen3Config,
    base_name: &str,
    resampler: ResamplerConfig,
    seed: u64,
) -> Result<Adapter> {
    let mut rng = Rng::new(seed);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj"];
    let r = 4;
    let mut pairs = std::collections::BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for m in targets {
            let (out, inp) = cfg.projection_shape(m).expect("a Qwen3 projection");
            let a = Tensor::from_vec(
                rng.normal_vec(r * inp, 1.0 / (inp as f64).sqrt()),
                (r, inp),
                &Device::Cpu,
            )?;
            let b = Tensor::from_vec(rng.normal_vec(out * r, 0.05), (out, r), &Device::Cpu)?;
            pairs.insert(
                Site {
                    layer,
                    module: m.to_string(),
                },
                LoraPair { a, b },
            );
        }
    }
    let lora = Lora {
        config: LoraConfig::new(r, 8.0, &targets, Some(base_name.to_string())),
        pairs,
    };
    let resampler = Resampler::init(resampler, &mut rng, &Device::Cpu)?;
    Ok(Adapter {
        dir: Default::default(),
        manifest: Some(AdapterManifest::new(
            BaseModelRef::of(base_name, cfg),
            -1,
            crate::tokenizer::DEFAULT_MAX_TOKENS,
            Some(resampler.config().clone()),
        )),
        lora: Some(lora),
        resampler: Some(resampler),
    })
}

/// The tiny model + tiny adapter used by the tests and the README's smoke run:
/// `<out>/model` and `<out>/adapter`. `tokenizer`: the bytes of the model's `tokenizer.json`.
pub fn write_tiny(out: &Path, tokenizer: &[u8], seed: u64) -> Result<()> {
    let cfg = shape("tiny")?;
    write_model(&cfg, &out.join("model"), tokenizer, DType::F32, seed)?;
    let rcfg = ResamplerConfig {
        width: 64,
        heads: 4,
        ff_mult: 2,
        ..ResamplerConfig::for_input(cfg.hidden_size)
    };
    make_adapter(&cfg, "qwenclip-tiny", rcfg, seed.wrapping_add(1))?.save(&out.join("adapter"))
}

/// A tiny SDXL teacher in diffusers layout under `dir`, with the real CLIP vocabulary (49,408)
/// so the real tokenizer works: `text_encoder/` (CLIP-L stand-in: hidden 24, 2 heads, 2 layers,
/// ffn 48, quick_gelu), `text_encoder_2/` (CLIP-G stand-in: hidden 40, 2 heads, 2 layers, ffn
/// 80, gelu, projection 16), and `tokenizer/` + `tokenizer_2/` with the CLIP `tokenizer.json`.
/// Configs carry SDXL's own token ids (bos 0, eos 2, pad 1). Outputs: `[B,77,64]`, `[B,16]`.
pub fn write_tiny_teacher(dir: &Path, seed: u64) -> Result<()> {
    // (folder, hidden, ffn, act, projection)
    let encoders = [
        ("text_encoder", 24, 48, "quick_gelu", None),
        ("text_encoder_2", 40, 80, "gelu", Some(16)),
    ];
    let (vocab, max_pos, layers, heads) = (49_408usize, 77usize, 2usize, 2usize);
    let mut rng = Rng::new(seed);
    for (name, h, ffn, act, proj) in encoders {
        let sub = dir.join(name);
        let cfg = ClipTextConfig {
            vocab_size: vocab,
            hidden_size: h,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            max_position_embeddings: max_pos,
            hidden_act: act.to_string(),
            layer_norm_eps: 1e-5,
            projection_dim: proj,
            eos_token_id: 2,
        };
        let mut tensors = HashMap::new();
        for p in clip_schema::tensors(&cfg) {
            let shape = p.shape(&cfg);
            let (std, mean) = match p {
                ClipParam::TokenEmbedding => (0.5, 0.0),
                ClipParam::PositionEmbedding => (0.1, 0.0),
                ClipParam::FinalNorm(field) | ClipParam::Layer { field, .. } if p.is_norm() => {
                    (0.1, if field == Field::Weight { 1.0 } else { 0.0 })
                }
                ClipParam::Layer {
                    field: Field::Bias, ..
                } => (0.02, 0.0),
                _ => (1.0 / (shape[1] as f64).sqrt(), 0.0),
            };
            let data = normal_around(&mut rng, &shape, std, mean);
            tensors.insert(p.hf_name(), Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_atomic(&tensors, Some(meta), &sub.join("model.safetensors"))?;
        let mut config = serde_json::to_value(&cfg).expect("config serialises");
        let class = if proj.is_some() {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        };
        let extra = serde_json::json!({
            "architectures": [class],
            "model_type": "clip_text_model",
            "projection_dim": proj.unwrap_or(h),
            "bos_token_id": 0,
            "pad_token_id": 1,
            "torch_dtype": "float32",
        });
        for (k, v) in extra.as_object().expect("an object") {
            config[k] = v.clone();
        }
        let json = serde_json::to_vec_pretty(&config).expect("config serialises");
        crate::formats::safetensors::write_atomic(&sub.join("config.json"), &json)?;
    }
    for tok in ["tokenizer", "tokenizer_2"] {
        crate::formats::safetensors::write_atomic(
            &dir.join(tok).join("tokenizer.json"),
            crate::teacher::EMBEDDED_CLIP_TOKENIZER,
        )?;
    }
    Ok(())
}
