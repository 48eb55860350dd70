//! `qwenclip cache-targets`: stage 1 of distillation, the teacher's outputs for a caption set.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use qwenclip::data::{build_cache, load_captions, progress_line, CacheOptions};
use qwenclip::teacher::Teacher;

use super::DeviceArg;

#[derive(Args)]
pub struct CacheArgs {
    /// SDXL diffusers folder or single-file SDXL checkpoint (.safetensors).
    #[arg(long)]
    teacher: PathBuf,
    /// Captions: a folder of .txt files, a .jsonl, a .csv, or a text file with one caption per line.
    #[arg(long)]
    captions: PathBuf,
    /// JSONL field or CSV column holding the caption (default: caption, then text).
    #[arg(long)]
    column: Option<String>,
    /// Cache folder (resumed when it already holds part of the same cache).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    shard_size: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Store targets as f16 (half the disk).
    #[arg(long)]
    f16: bool,
    /// Replace a cache made with another teacher or other captions.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

pub fn run(a: CacheArgs) -> Result<()> {
    let captions = load_captions(&a.captions, a.column.as_deref())?;
    eprintln!("{}", captions.report);
    let teacher = Teacher::load(&a.teacher, &a.device.device()?)?;
    eprintln!("{}", teacher.describe());
    let opts = CacheOptions {
        shard_size: a.shard_size,
        batch_size: a.batch_size,
        f16: a.f16,
        overwrite: a.overwrite,
    };
    let cache = build_cache(&teacher, &captions, &a.out, &opts, &mut |p| {
        eprint!("\r{}   ", progress_line(p))
    })?;
    eprintln!();
    let m = cache.manifest();
    println!(
        "{}: {} captions in {} shards ({}), prompt_embeds [{}, {}], pooled [{}]; {} captions were longer than 77 tokens and truncated",
        a.out.display(),
        cache.len(),
        m.shards.len(),
        m.dtype,
        m.dims.seq,
        m.dims.embed,
        m.dims.pooled,
        m.truncated
    );
    Ok(())
}
