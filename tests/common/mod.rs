//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn parity(rel: &str) -> PathBuf {
    root().join("tests/fixtures/parity").join(rel)
}

pub fn qwen_tokenizer() -> PathBuf {
    root().join("tests/fixtures/tokenizers/qwen_tokenizer.json")
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute difference, after casting both to f32.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute value (a scale for relative tolerances).
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: max |diff| = {d:e} > {tol:e}");
    eprintln!("{what}: max |diff| = {d:e}");
}

/// `[B,T]` i64 ids -> u32 tensor, and 0/1 mask rows.
pub fn ids_and_mask(case: &HashMap<String, Tensor>) -> (Tensor, Vec<Vec<u8>>) {
    let ids = case["input_ids"].to_dtype(DType::U32).unwrap();
    let mask: Vec<Vec<u8>> = case["attention_mask"]
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec2::<u8>()
        .unwrap();
    (ids, mask)
}

pub fn lengths(mask: &[Vec<u8>]) -> Vec<usize> {
    mask.iter()
        .map(|r| r.iter().filter(|&&m| m == 1).count())
        .collect()
}

/// A fresh temporary folder under the target dir, removed and recreated.
pub fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `cmd`, fails the test with its output unless it succeeds, and returns its stdout.
pub fn stdout_of(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{cmd:?}: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// `qwenclip-dev tiny --out OUT`: the tiny model, adapter and SDXL teacher, written by the
/// developer command as the README's smoke run and the ComfyUI tests do.
pub fn dev_tiny(out: &Path) {
    stdout_of(
        std::process::Command::new(env!("CARGO_BIN_EXE_qwenclip-dev"))
            .args(["tiny", "--out"])
            .arg(out),
    );
}

/// The tiny model + adapter, written once per test binary into `target/test-scratch`.
pub fn tiny() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let d = scratch(&format!("tiny-{}", std::process::id()));
        qwenclip::dev::tiny::write_tiny(&d, qwenclip::dev::QWEN_TOKENIZER, 0).unwrap();
        d
    })
    .clone()
}
