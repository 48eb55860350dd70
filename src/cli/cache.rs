//! `qwenclip cache-targets`: stage 1 of distillation, the teacher's outputs for a caption set.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use qwenclip::data::{build_cache, load_captions, CacheOptions, CacheProgress};
use qwenclip::teacher::Teacher;

use super::{bar, hms, DeviceArg};

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

/// `[=====>    ] 512/2000 25% 41.2 captions/s ETA 0:36`: one line for a terminal (printed
/// with `\r` to stderr).
fn progress_line(p: &CacheProgress) -> String {
    let frac = if p.total == 0 {
        1.0
    } else {
        (p.done as f64 / p.total as f64).clamp(0.0, 1.0)
    };
    let eta = match p.eta_s {
        Some(s) if s.is_finite() => hms(s),
        _ => "--:--".to_string(),
    };
    format!(
        "{} {}/{} {}% {:.1} captions/s ETA {eta}",
        bar(frac),
        p.done,
        p.total,
        (frac * 100.0).floor() as usize,
        p.captions_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_renders() {
        let p = CacheProgress {
            done: 512,
            total: 2000,
            resumed: 0,
            elapsed_s: 12.4,
            eta_s: Some(36.1),
            captions_per_s: 41.23,
        };
        let line = progress_line(&p);
        assert!(line.starts_with("[=====>"), "{line}");
        assert!(
            line.ends_with("] 512/2000 25% 41.2 captions/s ETA 0:36"),
            "{line}"
        );
        let done = progress_line(&CacheProgress {
            done: 2000,
            eta_s: Some(0.0),
            ..p
        });
        assert!(
            done.starts_with("[====================]") && done.contains("100%"),
            "{done}"
        );
        let start = progress_line(&CacheProgress {
            done: 0,
            eta_s: None,
            captions_per_s: 0.0,
            ..p
        });
        assert!(
            start.contains("ETA --:--") && start.starts_with("[>"),
            "{start}"
        );
        let long = progress_line(&CacheProgress {
            eta_s: Some(3725.0),
            ..p
        });
        assert!(long.ends_with("ETA 1:02:05"), "{long}");
    }
}
