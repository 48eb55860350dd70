//! `qwenclip-dev bench-ffi`: what the C boundary costs on top of the Rust API, on a model small
//! enough for the boundary to matter. Both sides encode the same prompts into an f32 buffer;
//! the C side goes through `qwenclip_encode` (status codes, handle registry, argument checks,
//! the one copy into the caller's buffer).

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use qwenclip::ffi;
use qwenclip::{Encoder, EncoderOptions};

#[derive(Args)]
pub struct BenchFfiArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long, default_value_t = 200)]
    reps: usize,
}

pub fn run(a: BenchFfiArgs) -> Result<()> {
    let prompts = [
        "a red cube left of a blue sphere",
        "a cat sleeping under a wooden table",
    ];
    let enc = Encoder::load(&a.model, Some(&a.adapter), EncoderOptions::default())?;
    let cfg =
        CString::new(serde_json::json!({"model": a.model, "adapter": a.adapter}).to_string())?;
    let mut handle = 0u64;
    if ffi::encoder::qwenclip_encoder_load(cfg.as_ptr(), &mut handle)
        != ffi::qwenclip_status::QWENCLIP_OK
    {
        bail!("qwenclip_encoder_load failed");
    }
    let c_prompts: Vec<CString> = prompts
        .iter()
        .map(|p| CString::new(*p))
        .collect::<Result<_, _>>()?;
    let ptrs: Vec<*const c_char> = c_prompts.iter().map(|c| c.as_ptr()).collect();
    let n = prompts.len();
    let mut embeds = vec![0f32; n * 77 * 2048];
    let mut pooled = vec![0f32; n * 1280];
    let mut rust_api = || -> Result<()> {
        enc.encode(&prompts)?.copy_to(&mut embeds, &mut pooled)?;
        Ok(())
    };
    let mut e2 = vec![0f32; n * 77 * 2048];
    let mut p2 = vec![0f32; n * 1280];
    let mut c_abi = || -> Result<()> {
        let s = ffi::encoder::qwenclip_encode(
            handle,
            ptrs.as_ptr(),
            n,
            e2.as_mut_ptr(),
            e2.len(),
            p2.as_mut_ptr(),
            p2.len(),
        );
        if s != ffi::qwenclip_status::QWENCLIP_OK {
            bail!("qwenclip_encode failed: {s:?}");
        }
        Ok(())
    };
    rust_api()?;
    c_abi()?;
    // Interleaved pairs, so drift in machine load hits both sides alike.
    let (mut tr, mut tc) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        let s = Instant::now();
        rust_api()?;
        tr.push(s.elapsed().as_secs_f64() * 1e3);
        let s = Instant::now();
        c_abi()?;
        tc.push(s.elapsed().as_secs_f64() * 1e3);
    }
    ffi::encoder::qwenclip_encoder_free(handle);
    tr.sort_by(f64::total_cmp);
    tc.sort_by(f64::total_cmp);
    let (mr, mc) = (tr[tr.len() / 2], tc[tc.len() / 2]);
    let report = serde_json::json!({
        "reps": a.reps, "batch": n, "rust_api_median_ms": mr, "c_abi_median_ms": mc,
        "overhead_pct": (mc / mr - 1.0) * 100.0, "outputs_equal": e2 == embeds && p2 == pooled,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
