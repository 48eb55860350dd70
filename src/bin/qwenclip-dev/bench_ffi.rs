//! `qwenclip-dev bench-ffi`: what the C boundary costs on top of the Rust API, on a model small
//! enough for the boundary to matter. Both sides encode the same prompts into an f32 buffer:
//! the Rust side with `Encoder::encode` + `Conditioning::copy_to`, the C side through
//! `qwenclip_encode` of the shared library loaded as a host loads it (status codes, handle
//! registry, argument checks, the one copy into the caller's buffer).

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use libloading::{Library, Symbol};
use qwenclip::{Encoder, EncoderOptions};

#[derive(Args)]
pub struct BenchFfiArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// The qwenclip shared library (default: the one beside this program, where
    /// `cargo build --features dev` puts both).
    #[arg(long)]
    lib: Option<PathBuf>,
    /// Instead of timing: this many load + encode + free cycles through the C ABI, reporting
    /// the resident memory along the way (a leak shows as growth).
    #[arg(long)]
    cycles: Option<usize>,
}

const OK: i32 = 0;
type Load = unsafe extern "C" fn(*const c_char, *mut u64) -> i32;
type Free = unsafe extern "C" fn(u64) -> i32;
type Encode =
    unsafe extern "C" fn(u64, *const *const c_char, usize, *mut f32, usize, *mut f32, usize) -> i32;
type LastError = unsafe extern "C" fn() -> *const c_char;

/// `--lib`, else `libqwenclip.so` (or the platform's name for it) beside this executable.
fn library_path(lib: Option<PathBuf>) -> Result<PathBuf> {
    let p = match lib {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("this program's folder")?
            .join(libloading::library_filename("qwenclip")),
    };
    ensure!(
        p.is_file(),
        "{}: no qwenclip shared library (build it with `cargo build --release --features dev`, or pass --lib)",
        p.display()
    );
    Ok(p)
}

/// The library's exports the benchmark calls.
struct CApi<'l> {
    load: Symbol<'l, Load>,
    free: Symbol<'l, Free>,
    encode: Symbol<'l, Encode>,
    last_error: Symbol<'l, LastError>,
}

impl<'l> CApi<'l> {
    fn new(lib: &'l Library) -> Result<Self> {
        // SAFETY: the types are those of include/qwenclip.h.
        unsafe {
            Ok(CApi {
                load: lib.get(b"qwenclip_encoder_load")?,
                free: lib.get(b"qwenclip_encoder_free")?,
                encode: lib.get(b"qwenclip_encode")?,
                last_error: lib.get(b"qwenclip_last_error")?,
            })
        }
    }

    /// Fails with the library's message when `status` is not `QWENCLIP_OK`.
    fn check(&self, status: i32, what: &str) -> Result<()> {
        if status != OK {
            // SAFETY: qwenclip_last_error returns a NUL-terminated string owned by the library.
            let msg = unsafe { CStr::from_ptr((self.last_error)()) };
            bail!("{what} failed ({status}): {}", msg.to_string_lossy());
        }
        Ok(())
    }
}

pub fn run(a: BenchFfiArgs) -> Result<()> {
    let prompts = [
        "a red cube left of a blue sphere",
        "a cat sleeping under a wooden table",
    ];
    let lib_path = library_path(a.lib)?;
    // SAFETY: loading the qwenclip library runs no code beyond Rust's own initialisers.
    let lib = unsafe { Library::new(&lib_path) }
        .with_context(|| format!("loading {}", lib_path.display()))?;
    let c = CApi::new(&lib)?;
    if let Some(cycles) = a.cycles {
        return soak(&c, &a.model, &a.adapter, &prompts, cycles);
    }
    let enc = Encoder::load(&a.model, Some(&a.adapter), EncoderOptions::default())?;
    let cfg =
        CString::new(serde_json::json!({"model": a.model, "adapter": a.adapter}).to_string())?;
    let mut handle = 0u64;
    // SAFETY: a NUL-terminated config and a valid out-pointer.
    c.check(
        unsafe { (c.load)(cfg.as_ptr(), &mut handle) },
        "qwenclip_encoder_load",
    )?;
    let c_prompts = c_strings(&prompts)?;
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
        // SAFETY: `n` prompt pointers and two buffers of the lengths passed.
        let s = unsafe {
            (c.encode)(
                handle,
                ptrs.as_ptr(),
                n,
                e2.as_mut_ptr(),
                e2.len(),
                p2.as_mut_ptr(),
                p2.len(),
            )
        };
        c.check(s, "qwenclip_encode")
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
    // SAFETY: a handle from qwenclip_encoder_load, freed once.
    c.check(unsafe { (c.free)(handle) }, "qwenclip_encoder_free")?;
    tr.sort_by(f64::total_cmp);
    tc.sort_by(f64::total_cmp);
    let (mr, mc) = (tr[tr.len() / 2], tc[tc.len() / 2]);
    let report = serde_json::json!({
        "reps": a.reps, "batch": n, "rust_api_median_ms": mr, "c_abi_median_ms": mc,
        "overhead_pct": (mc / mr - 1.0) * 100.0, "outputs_equal": e2 == embeds && p2 == pooled,
        "library": lib_path,
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn c_strings(prompts: &[&str]) -> Result<Vec<CString>> {
    Ok(prompts
        .iter()
        .map(|p| CString::new(*p))
        .collect::<Result<_, _>>()?)
}

/// `cycles` x (load, encode, free) through the C ABI; prints the resident memory after a
/// warm-up (allocator pools, lazily built tables), at each tenth and at the end, as JSON.
fn soak(
    c: &CApi,
    model: &std::path::Path,
    adapter: &std::path::Path,
    prompts: &[&str],
    cycles: usize,
) -> Result<()> {
    const WARM_UP: usize = 10;
    let cfg = CString::new(serde_json::json!({"model": model, "adapter": adapter}).to_string())?;
    let c_prompts = c_strings(prompts)?;
    let ptrs: Vec<*const c_char> = c_prompts.iter().map(|c| c.as_ptr()).collect();
    // SDXL-sized buffers: the library checks they are large enough.
    let mut out = vec![0f32; prompts.len() * 77 * 2048];
    let mut pooled = vec![0f32; prompts.len() * 1280];
    let mut rss_mb = Vec::new();
    let start = Instant::now();
    for i in 1..=WARM_UP + cycles {
        let mut h = 0u64;
        // SAFETY: a NUL-terminated config and a valid out-pointer.
        c.check(
            unsafe { (c.load)(cfg.as_ptr(), &mut h) },
            "qwenclip_encoder_load",
        )?;
        // SAFETY: `ptrs.len()` prompt pointers and two buffers of the lengths passed.
        let s = unsafe {
            (c.encode)(
                h,
                ptrs.as_ptr(),
                ptrs.len(),
                out.as_mut_ptr(),
                out.len(),
                pooled.as_mut_ptr(),
                pooled.len(),
            )
        };
        c.check(s, "qwenclip_encode")?;
        // SAFETY: a handle from qwenclip_encoder_load, freed once.
        c.check(unsafe { (c.free)(h) }, "qwenclip_encoder_free")?;
        if i == WARM_UP || (i > WARM_UP && (i - WARM_UP).is_multiple_of(cycles.div_ceil(10).max(1)))
        {
            let mb = crate::bench::proc_status_bytes("VmRSS:") as f64 / 1e6;
            eprintln!("cycle {}: {mb:.1} MB resident", i - WARM_UP);
            rss_mb.push(mb);
        }
    }
    let first = rss_mb.first().copied().unwrap_or(0.0);
    let last = rss_mb.last().copied().unwrap_or(0.0);
    let report = serde_json::json!({
        "cycles": cycles, "warm_up": WARM_UP, "rss_mb": rss_mb,
        "growth_mb": last - first, "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
