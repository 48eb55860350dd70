//! `qwenclip teacher`: SDXL conditioning from SDXL's own text encoders (CLIP-L + CLIP-G).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use qwenclip::teacher::{Teacher, MAX_PROMPT_TOKENS};

use super::{DTypeArg, DeviceArg};

#[derive(Args)]
pub struct TeacherArgs {
    /// A diffusers SDXL folder (text_encoder/, text_encoder_2/) or a single-file SDXL .safetensors.
    #[arg(long)]
    teacher: PathBuf,
    /// A prompt; repeat for a batch. "" is the empty prompt.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Output .safetensors (prompt_embeds [B,77,D], pooled_prompt_embeds [B,P], f32).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Compute dtype of the encoders (outputs are f32).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
}

pub fn run(a: TeacherArgs) -> Result<()> {
    let teacher = Teacher::load_with_dtype(&a.teacher, &a.device.device()?, a.dtype.dtype())?;
    for n in teacher.notes() {
        eprintln!("note: {n}");
    }
    let prompts: Vec<&str> = a.prompts.iter().map(String::as_str).collect();
    let out = teacher.encode(&prompts)?;
    for (i, &d) in out.dropped_tokens.iter().enumerate() {
        if d > 0 {
            eprintln!(
                "warning: prompt {i} is longer than {MAX_PROMPT_TOKENS} CLIP tokens; the last {d} were dropped"
            );
        }
    }
    let mut tensors = HashMap::new();
    tensors.insert("prompt_embeds".to_string(), out.prompt_embeds);
    tensors.insert("pooled_prompt_embeds".to_string(), out.pooled);
    let meta = HashMap::from([("qwenclip.teacher".to_string(), teacher.fingerprint())]);
    qwenclip::formats::save_atomic(&tensors, Some(meta), &a.out)?;
    let mut names: Vec<String> = tensors
        .iter()
        .map(|(k, v)| format!("{k} {:?}", v.dims()))
        .collect();
    names.sort();
    println!("wrote {}: {}", a.out.display(), names.join(", "));
    Ok(())
}
