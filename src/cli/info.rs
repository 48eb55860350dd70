//! `qwenclip info`: what a folder or file holds, without running anything.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use qwenclip::adapter::{Adapter, MANIFEST_FILE};
use qwenclip::formats::Weights;
use qwenclip::llm::Qwen3Config;
use qwenclip::lora::Lora;

pub fn run(path: &Path) -> Result<()> {
    if qwenclip::formats::gguf::is_gguf(path) && path.is_file() {
        return gguf_info(path);
    }
    if path.join("config.json").is_file() {
        let cfg = Qwen3Config::load(&path.join("config.json"))?;
        let w = Weights::open_model_dir(path, DType::F32, &Device::Cpu)?;
        let names = w.names();
        let params: usize = names
            .iter()
            .map(|n| w.shape_of(n).map_or(0, |s| s.iter().product::<usize>()))
            .sum();
        println!("Qwen3 model: {}", path.display());
        println!("  {}", cfg.shape_summary());
        println!(
            "  rope_theta {}, rms_norm_eps {}, tied embeddings: {}",
            cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings
        );
        println!(
            "  {} tensors, {:.1}M parameters",
            names.len(),
            params as f64 / 1e6
        );
        println!("  fingerprint {}", cfg.fingerprint());
        println!(
            "  tokenizer.json: {}",
            if path.join("tokenizer.json").is_file() {
                "present"
            } else {
                "MISSING"
            }
        );
        return Ok(());
    }
    if path.join(MANIFEST_FILE).is_file() || Lora::present(path) {
        let a = Adapter::load(path, &Device::Cpu)?;
        println!("adapter: {}", path.display());
        match &a.manifest {
            Some(m) => {
                println!(
                    "  base model: {} ({}, {})",
                    m.base_model.name, m.base_model.shape, m.base_model.fingerprint
                );
                println!(
                    "  hidden layer {}, token limit {}",
                    m.hidden_layer, m.max_tokens
                );
            }
            None => println!(
                "  bare PEFT LoRA (no {MANIFEST_FILE}: hidden states only, no SDXL conditioning)"
            ),
        }
        if let Some(l) = &a.lora {
            let params: usize = l
                .pairs
                .values()
                .map(|p| p.a.elem_count() + p.b.elem_count())
                .sum();
            println!(
                "  LoRA: r {}, alpha {}, rslora {}, targets {}, {} sites, {:.2}M parameters",
                l.config.r,
                l.config.lora_alpha,
                l.config.use_rslora,
                l.config.target_modules,
                l.pairs.len(),
                params as f64 / 1e6
            );
        }
        if let Some(r) = &a.resampler {
            println!(
                "  resampler: {}, {:.2}M parameters",
                serde_json::to_string(r.config())?,
                r.config().parameter_count() as f64 / 1e6
            );
        }
        return Ok(());
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        let w = Weights::open(&[path.to_path_buf()], path, DType::F32, &Device::Cpu)?;
        let mut names = w.names();
        names.sort();
        println!("safetensors: {} ({} tensors)", path.display(), names.len());
        for n in names {
            println!("  {n} {:?}", w.shape_of(&n)?);
        }
        return Ok(());
    }
    bail!("{}: not a model folder (config.json), a .gguf file, an adapter (qwenclip.json / adapter_config.json) or a .safetensors file", path.display())
}

/// A GGUF Qwen3: shape, tokenizer, and type and size of each tensor group.
fn gguf_info(path: &Path) -> Result<()> {
    use qwenclip::formats::gguf::GgufFile;
    use qwenclip::llm::gguf::group_summary;
    let g = GgufFile::open(path)?;
    let cfg = Qwen3Config::from_gguf(&g)?;
    let file_bytes = std::fs::metadata(path)?.len();
    println!(
        "GGUF Qwen3 model: {} ({})",
        path.display(),
        human(file_bytes as usize)
    );
    println!("  {}", cfg.shape_summary());
    println!(
        "  rope_theta {}, rms_norm_eps {}, tied embeddings: {}",
        cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings
    );
    println!("  fingerprint {}", cfg.fingerprint());
    let beside = path.with_file_name("tokenizer.json");
    let tok = if beside.is_file() {
        format!("{} (beside the file)", beside.display())
    } else {
        match qwenclip::tokenizer::gguf::read(&g) {
            Ok(t) => format!("embedded, {} tokens", t.get_vocab_size(true)),
            Err(e) => format!("MISSING: {e}"),
        }
    };
    println!("  tokenizer: {tok}");
    println!(
        "  {:<11} {:>7} {:>12} {:>11}  types",
        "group", "tensors", "parameters", "size"
    );
    let groups = group_summary(&g);
    let (mut n, mut p, mut b) = (0, 0, 0);
    for (name, g) in &groups {
        let types: Vec<String> = g.types.iter().map(|(t, c)| format!("{t} x{c}")).collect();
        println!(
            "  {:<11} {:>7} {:>11.2}M {:>11}  {}",
            name,
            g.tensors,
            g.parameters as f64 / 1e6,
            human(g.bytes),
            types.join(", ")
        );
        (n, p, b) = (n + g.tensors, p + g.parameters, b + g.bytes);
    }
    println!(
        "  {:<11} {:>7} {:>11.2}M {:>11}  {:.2} bits/parameter",
        "total",
        n,
        p as f64 / 1e6,
        human(b),
        b as f64 * 8.0 / p.max(1) as f64
    );
    Ok(())
}

/// Bytes as MB / GB (decimal).
fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}
