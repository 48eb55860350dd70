//! One fuzz target per parser of outside input (docs/reliability.md). Each target takes the
//! bytes of one file (or of one JSON text or prompt), writes them where the library would find
//! them and runs the library's own loader on them, as far as a user's file would go. An
//! error is the right answer to a bad file; a panic, an abort, a hang or a huge allocation is
//! a bug.
//!
//! The same functions run under `cargo +nightly fuzz` (`fuzz/fuzz_targets/`) and, on stable,
//! in `cargo test --test fuzz_regressions`, which replays every input kept under
//! `fuzz/regressions/<target>/` and checks that the seed inputs (valid files) still load.
//!
//! Targets that stand for a file inside a folder (an adapter, a target cache) take a
//! selector byte first: which file of a valid folder the rest of the input replaces.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use qwenclip::data::{build_cache, load_captions, CacheOptions, CaptionSet, TargetCache};
use qwenclip::formats::gguf::GgufFile;
use qwenclip::formats::pth::{read_pth, KeyMap};
use qwenclip::formats::safetensors::{read_metadata, read_tensor_names, shard_files};
use qwenclip::formats::Weights;
use qwenclip::llm::Qwen3Config;
use qwenclip::teacher::{ClipTextConfig, Teacher};
use qwenclip::tokenizer::syntax::{PromptSyntax, WeightedPrompt};
use qwenclip::tokenizer::PromptTokenizer;
use qwenclip::training::{TargetDims, TrainConfig, Trainer};
use qwenclip::unet::{UNet, UNetConfig};
use qwenclip::{Adapter, Encoder, EncoderOptions, Error, Result};

/// A target: an error is a fine answer, a panic is not.
pub type Target = fn(&[u8]) -> Result<()>;

/// Every target by name: the name is the fuzz target's and the regression folder's.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("shard_index", shard_index),
    ("gguf", gguf),
    ("pth", pth),
    ("configs", configs),
    ("tokenizer", tokenizer),
    ("adapter", adapter),
    ("captions", captions),
    ("cache", cache),
    ("checkpoint", checkpoint),
    ("unet", unet),
    ("teacher", teacher),
    ("ffi_json", ffi_json),
    ("prompt", prompt),
];

/// The repository root (the harness is compiled from `fuzz/` and from the main crate's tests).
pub fn repo_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if here.join("fuzz_targets").is_dir() {
        here.parent().expect("fuzz/ has a parent").to_path_buf()
    } else {
        here
    }
}

/// Valid files the targets build on, written once per process.
struct Fixtures {
    model: PathBuf,
    adapter: PathBuf,
    cache: PathBuf,
    checkpoint: PathBuf,
    encoder: Encoder,
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("qwenclip-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

/// Dimensions of the tiny SDXL teacher (`write_tiny_teacher`).
const TINY_DIMS: TargetDims = TargetDims {
    seq: 77,
    embed: 64,
    pooled: 16,
};

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let root = scratch().join("fixtures");
        qwenclip::dev::tiny::write_tiny(&root, qwenclip::dev::QWEN_TOKENIZER, 0)
            .expect("tiny model");
        let teacher_dir = root.join("teacher");
        qwenclip::dev::tiny::write_tiny_teacher(&teacher_dir, 0).expect("tiny teacher");
        let teacher = Teacher::load(&teacher_dir, &Device::Cpu).expect("tiny teacher loads");
        let captions = CaptionSet::from_captions(
            [
                "a red cube",
                "a cat under a table",
                "a green car",
                "a house",
            ],
            "fuzz captions",
        )
        .expect("captions");
        let cache = root.join("cache");
        let opts = CacheOptions {
            shard_size: 2,
            batch_size: 2,
            ..Default::default()
        };
        build_cache(&teacher, &captions, &cache, &opts, &mut |_| {}).expect("tiny cache");
        let encoder = Encoder::load(&root.join("model"), None, EncoderOptions::default())
            .expect("tiny encoder");
        let cfg = TrainConfig {
            lora_r: 2,
            resampler_width: 16,
            resampler_heads: 2,
            resampler_ff_mult: 2,
            resampler_layers: 1,
            ..Default::default()
        };
        let checkpoint = root.join("checkpoint.safetensors");
        Trainer::new(encoder.clone(), cfg, TINY_DIMS)
            .and_then(|t| t.save(&checkpoint, serde_json::json!({})))
            .expect("tiny checkpoint");
        Fixtures {
            model: root.join("model"),
            adapter: root.join("adapter"),
            cache,
            checkpoint,
            encoder,
        }
    })
}

/// libFuzzer's panic hook aborts on every panic, caught or not. The library catches the
/// panics of the `tokenizers` crate on purpose (it panics on some malformed files): those
/// unwind to the library's handler here. Any other panic, and one that escapes the library,
/// still aborts (libfuzzer-sys aborts on a panic out of the target).
fn let_caught_dependency_panics_unwind() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info
                .location()
                .is_some_and(|l| l.file().contains("/tokenizers-"))
            {
                previous(info)
            }
        }));
    });
}

/// A fresh folder for one target's input (emptied on every call).
fn work(name: &str) -> PathBuf {
    let_caught_dependency_panics_unwind();
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

fn write(path: &Path, data: &[u8]) -> PathBuf {
    std::fs::write(path, data).expect("write input");
    path.to_path_buf()
}

/// `std::fs::copy` uses copy_file_range, which fails with EINTR when libFuzzer's timeout
/// alarm lands mid-copy; read and write_all retry interrupted calls.
fn copy_file(from: &Path, to: &Path) {
    write(to, &std::fs::read(from).expect("read file"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy dir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        copy_file(&e.path(), &to.join(e.file_name()));
    }
}

/// The files of `dir`, sorted by name: what a selector byte picks from.
fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// `data[0]` picks one of `n` choices; the rest is the payload.
fn select(data: &[u8], n: usize) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&k, rest)) => (k as usize % n, rest),
        None => (0, data),
    }
}

/// A safetensors file: header, metadata, then every tensor read as f32.
pub fn safetensors(data: &[u8]) -> Result<()> {
    let path = write(&work("safetensors").join("model.safetensors"), data);
    read_tensor_names(&path)?;
    read_metadata(&path)?;
    let w = Weights::open(std::slice::from_ref(&path), &path, DType::F32, &Device::Cpu)?;
    for name in w.names() {
        let shape = w.shape_of(&name)?;
        w.get_as(&name, &shape, DType::F32)?;
    }
    Ok(())
}

/// A sharded checkpoint's `model.safetensors.index.json` (the shards it names stay missing
/// unless they are the one shard written beside it).
pub fn shard_index(data: &[u8]) -> Result<()> {
    let dir = work("shard_index");
    copy_file(
        &repo_root().join("tests/fixtures/gguf/reference.safetensors"),
        &dir.join("model-00001-of-00001.safetensors"),
    );
    let index = write(&dir.join("model.safetensors.index.json"), data);
    let files = shard_files(&index)?;
    Weights::open(&files, &index, DType::F32, &Device::Cpu)?;
    Ok(())
}

/// A GGUF file: header, metadata, tensor directory, every tensor dequantized, and the Qwen3
/// config and tokenizer it carries (when it names an architecture).
pub fn gguf(data: &[u8]) -> Result<()> {
    let path = write(&work("gguf").join("model.gguf"), data);
    let g = GgufFile::open(&path)?;
    let cfg = Qwen3Config::from_gguf(&g);
    let tok = qwenclip::tokenizer::gguf::read(&g);
    let mut reader = g.reader()?;
    for e in g.tensors() {
        reader.dense(&e.name, &e.shape, DType::F32, &Device::Cpu)?;
    }
    // A bare container (no architecture) is only checked as one.
    if g.architecture().is_some() {
        cfg?;
        tok?;
    }
    Ok(())
}

/// A PyTorch zip `.pth` (pickle + tensor records).
pub fn pth(data: &[u8]) -> Result<()> {
    let path = write(&work("pth").join("resampler.pth"), data);
    let map = KeyMap::load(&repo_root().join("tests/fixtures/parity/resampler/keymap.json"))?;
    read_pth(&path, &map)?;
    Ok(())
}

/// A `config.json`: Qwen3's, CLIP's or a UNet's (selector byte), then the checks the loaders
/// run on it.
pub fn configs(data: &[u8]) -> Result<()> {
    let (k, body) = select(data, 3);
    let path = write(&work("configs").join("config.json"), body);
    match k {
        0 => {
            let c = Qwen3Config::load(&path)?;
            c.validate().map_err(Error::Invalid)?;
            c.resolve_hidden_layer(-1)?;
        }
        1 => {
            let c = ClipTextConfig::load(&path)?;
            c.activation().map_err(Error::Invalid)?;
        }
        _ => {
            let c = UNetConfig::from_file(&path)?;
            c.levels();
        }
    }
    Ok(())
}

/// A `tokenizer.json`, then a prompt through it.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let path = write(&work("tokenizer").join("tokenizer.json"), data);
    let t = PromptTokenizer::load(&path)?;
    t.encode_batch(&["a red cube left of a blue sphere", ""], 16)?;
    Ok(())
}

/// One file of the tiny adapter folder (selector byte) replaced, then the folder loaded and
/// checked against its base model.
pub fn adapter(data: &[u8]) -> Result<()> {
    let f = fixtures();
    let dir = work("adapter").join("adapter");
    copy_dir(&f.adapter, &dir);
    let files = files_of(&dir);
    let (k, body) = select(data, files.len());
    write(&files[k], body);
    let a = Adapter::load(&dir, &Device::Cpu)?;
    a.check_base(f.encoder.llm().config())?;
    drop(a);
    let mut e = f.encoder.clone();
    e.set_adapter(Some(&dir))?;
    e.encode(&["a red cube"])?;
    Ok(())
}

/// A caption file: `.txt`, `.jsonl` or `.csv` (selector byte; JSONL and CSV with and without
/// a column name).
pub fn captions(data: &[u8]) -> Result<()> {
    const KINDS: [(&str, Option<&str>); 5] = [
        ("txt", None),
        ("jsonl", None),
        ("jsonl", Some("prompt")),
        ("csv", None),
        ("csv", Some("prompt")),
    ];
    let (k, body) = select(data, KINDS.len());
    let (ext, column) = KINDS[k];
    let path = write(&work("captions").join(format!("captions.{ext}")), body);
    load_captions(&path, column)?;
    Ok(())
}

/// One file of a finished target cache (manifest or a shard; selector byte) replaced, then
/// the cache opened, verified and read in full.
pub fn cache(data: &[u8]) -> Result<()> {
    let dir = work("cache").join("cache");
    copy_dir(&fixtures().cache, &dir);
    let files = files_of(&dir);
    let (k, body) = select(data, files.len());
    write(&files[k], body);
    let c = TargetCache::open(&dir)?;
    let all: Vec<usize> = (0..c.len()).collect();
    c.get_batch(&all, &Device::Cpu)?;
    Ok(())
}

/// A training checkpoint, resumed on the tiny base model.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let path = write(&work("checkpoint").join("checkpoint.safetensors"), data);
    Trainer::resume(fixtures().encoder.clone(), &path)?;
    Ok(())
}

/// A single-file UNet (the judge of vision distillation) with the tiny judge's config.
pub fn unet(data: &[u8]) -> Result<()> {
    let path = write(&work("unet").join("unet.safetensors"), data);
    let cfg = qwenclip::dev::tiny::unet::tiny_judge_shape();
    UNet::load_with_config(&path, &cfg, DType::F32, &Device::Cpu)?;
    Ok(())
}

/// A single-file SDXL checkpoint as the teacher (CLIP-L + CLIP-G), then one row of token ids
/// through both encoders.
pub fn teacher(data: &[u8]) -> Result<()> {
    let path = write(&work("teacher").join("sdxl.safetensors"), data);
    let t = Teacher::load(&path, &Device::Cpu)?;
    let ids = candle_core::Tensor::zeros((1, 77), DType::U32, &Device::Cpu)?;
    t.encode_ids(&ids, &ids)?;
    Ok(())
}

// The C ABI's JSON entry points, as a host calls them.
extern "C" {
    fn qwenclip_encoder_load(config_json: *const c_char, out_handle: *mut u64) -> i32;
    fn qwenclip_encoder_free(handle: u64) -> i32;
    fn qwenclip_captions_read(
        spec_json: *const c_char,
        buf: *mut c_char,
        len: usize,
        needed: *mut usize,
    ) -> i32;
    fn qwenclip_run_open(encoder: u64, spec_json: *const c_char, out_handle: *mut u64) -> i32;
    fn qwenclip_run_free(handle: u64) -> i32;
}

/// Paths in a fuzzed JSON would read (or, for a run's `out`, write) anywhere on the machine:
/// they are pinned to the scratch folder, everything else is left as the fuzzer made it.
fn pin_paths(v: &mut serde_json::Value, dir: &Path) {
    let Some(o) = v.as_object_mut() else { return };
    let here = |name: &str| serde_json::Value::from(dir.join(name).display().to_string());
    if o.contains_key("model") {
        o.insert(
            "model".into(),
            fixtures().model.display().to_string().into(),
        );
    }
    for key in ["adapter", "out", "paths"] {
        if let Some(slot) = o.get_mut(key) {
            *slot = if key == "paths" {
                serde_json::json!([])
            } else {
                here(key)
            };
        }
    }
    if let Some(j) = o.get_mut("judge").and_then(|j| j.as_object_mut()) {
        j.insert("unet".into(), here("unet"));
    }
    if let Some(c) = o.get_mut("captions") {
        pin_paths(c, dir);
    }
}

fn status(code: i32, what: &str) -> Result<()> {
    match code {
        0 => Ok(()),
        c => Err(Error::Invalid(format!("{what}: status {c}"))),
    }
}

/// JSON handed to the C ABI (selector byte): an encoder config, a caption spec, a run spec.
pub fn ffi_json(data: &[u8]) -> Result<()> {
    let (k, body) = select(data, 3);
    let dir = work("ffi_json");
    // As text (what a C string carries); JSON the library would accept has its paths pinned.
    let lossy = String::from_utf8_lossy(body);
    let text = match serde_json::from_str::<serde_json::Value>(&lossy) {
        Ok(mut v) => {
            pin_paths(&mut v, &dir);
            v.to_string()
        }
        Err(_) => lossy.into_owned(),
    };
    let Ok(c) = CString::new(text) else {
        return Err(Error::Invalid("interior NUL".into()));
    };
    // SAFETY: valid NUL-terminated strings and out-pointers that live across each call.
    unsafe {
        match k {
            0 => {
                let mut h = 0u64;
                status(qwenclip_encoder_load(c.as_ptr(), &mut h), "encoder_load")?;
                status(qwenclip_encoder_free(h), "encoder_free")
            }
            1 => {
                let mut needed = 0usize;
                let mut buf = vec![0 as c_char; 4096];
                status(
                    qwenclip_captions_read(c.as_ptr(), buf.as_mut_ptr(), buf.len(), &mut needed),
                    "captions_read",
                )
            }
            _ => {
                let mut run = 0u64;
                let opened = status(
                    qwenclip_run_open(shared_encoder(), c.as_ptr(), &mut run),
                    "run_open",
                );
                if opened.is_ok() {
                    status(qwenclip_run_free(run), "run_free")?;
                }
                opened
            }
        }
    }
}

/// One encoder handle for every run the target opens (loading it is most of a call's time).
fn shared_encoder() -> u64 {
    static HANDLE: OnceLock<u64> = OnceLock::new();
    *HANDLE.get_or_init(|| {
        let model = CString::new(
            serde_json::json!({"model": fixtures().model.display().to_string()}).to_string(),
        )
        .expect("no NUL");
        let mut h = 0u64;
        // SAFETY: a NUL-terminated config and a valid out-pointer.
        let s = unsafe { qwenclip_encoder_load(model.as_ptr(), &mut h) };
        assert_eq!(s, 0, "the tiny encoder loads");
        h
    })
}

/// A prompt in each weighting syntax (selector byte), down to per-token weights.
pub fn prompt(data: &[u8]) -> Result<()> {
    const SYNTAX: [PromptSyntax; 3] =
        [PromptSyntax::None, PromptSyntax::Comfy, PromptSyntax::A1111];
    static TOKENIZER: OnceLock<PromptTokenizer> = OnceLock::new();
    let t = TOKENIZER.get_or_init(|| {
        PromptTokenizer::load(&repo_root().join("tests/fixtures/tokenizers/qwen_tokenizer.json"))
            .expect("Qwen tokenizer")
    });
    let (k, body) = select(data, SYNTAX.len());
    let text = String::from_utf8_lossy(body);
    let p = WeightedPrompt::parse(&text, SYNTAX[k])?;
    t.token_weights(&p)?;
    Ok(())
}

/// Valid inputs for every target: the test fixtures and the files of [`fixtures`], with their
/// selector byte. They start the fuzz corpora and must keep loading.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let root = repo_root().join("tests/fixtures");
    let f = fixtures();
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let with = |k: u8, p: &Path| [vec![k], read(p)].concat();
    let mut out: Vec<(&'static str, String, Vec<u8>)> = vec![
        ("safetensors", "reference".into(), read(&root.join("gguf/reference.safetensors"))),
        (
            "safetensors",
            "peft".into(),
            read(&root.join("interop/adapter_model.safetensors")),
        ),
        (
            "shard_index",
            "one-shard".into(),
            serde_json::to_vec(&serde_json::json!({
                "metadata": {},
                "weight_map": {"x": "model-00001-of-00001.safetensors"}
            }))
            .expect("json"),
        ),
        (
            "pth",
            "nested".into(),
            read(&root.join("parity/resampler/resampler_nested.pth")),
        ),
        ("gguf", "q8_0".into(), read(&root.join("gguf/gqa2_untied-q8_0.gguf"))),
        ("configs", "qwen3".into(), with(0, &f.model.join("config.json"))),
        (
            "configs",
            "clip".into(),
            with(1, &root.join("teacher/diffusers/text_encoder_2/config.json")),
        ),
        ("configs", "unet".into(), with(2, &root.join("unet/diffusers/unet/config.json"))),
        (
            "tokenizer",
            "clip".into(),
            read(&root.join("tokenizers/clip_tokenizer.json")),
        ),
        ("checkpoint", "tiny".into(), read(&f.checkpoint)),
        ("teacher", "sdxl-single".into(), read(&root.join("teacher/sdxl_single.safetensors"))),
        (
            "ffi_json",
            "encoder".into(),
            [b"\x00".to_vec(), br#"{"model": "m", "max_tokens": 32, "dtype": "f32"}"#.to_vec()]
                .concat(),
        ),
        (
            "ffi_json",
            "captions".into(),
            [b"\x01".to_vec(), br#"{"paths": [], "text": "a\nb\n\na", "column": null}"#.to_vec()]
                .concat(),
        ),
        (
            "ffi_json",
            "run".into(),
            [
                b"\x02".to_vec(),
                br#"{"out": "o", "captions": {"paths": [], "text": "a cat\na dog"}, "settings": {"steps": 2, "batch_size": 1}, "resume": "never"}"#.to_vec(),
            ]
            .concat(),
        ),
    ];
    for (i, file) in files_of(&f.adapter).iter().enumerate() {
        out.push(("adapter", format!("file{i}"), with(i as u8, file)));
    }
    for (i, file) in files_of(&f.cache).iter().enumerate() {
        out.push(("cache", format!("file{i}"), with(i as u8, file)));
    }
    let quants = scratch().join("seed-quants.gguf");
    let mut w = qwenclip::formats::gguf::GgufWriter::new();
    let t = candle_core::Tensor::arange(0f32, 512.0, &Device::Cpu)
        .and_then(|t| t.reshape((2, 256)))
        .expect("tensor");
    for ty in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        w.add(&format!("t.{ty:?}"), &t, ty).expect("quantize");
    }
    w.write(&quants).expect("write gguf");
    out.push(("gguf", "every-type".into(), read(&quants)));
    let unet = scratch().join("seed-unet.safetensors");
    qwenclip::dev::tiny::unet::write_unet(
        &qwenclip::dev::tiny::unet::tiny_judge_shape(),
        &unet,
        qwenclip::dev::tiny::unet::UNetFileLayout::SingleFile,
        DType::F32,
        0,
    )
    .expect("tiny unet");
    out.push(("unet", "tiny".into(), read(&unet)));
    for (k, text) in [
        (0u8, "a red cube left of a blue sphere"),
        (
            1,
            "a (red:1.3) cube, [blue] sphere, \\(literal\\), embedding:x",
        ),
        (2, "a ((red)) cube [[blue]] (sphere:0.5) BREAK night"),
    ] {
        out.push((
            "prompt",
            format!("syntax{k}"),
            [vec![k], text.as_bytes().to_vec()].concat(),
        ));
    }
    for (k, ext, body) in [
        (0u8, "txt", "a cat\n\na dog\n"),
        (
            2,
            "jsonl",
            "{\"prompt\": \"a cat\"}\n{\"prompt\": \"a dog\"}\n",
        ),
        (4, "csv", "id,prompt\n1,\"a cat, sitting\"\n2,a dog\n"),
    ] {
        out.push((
            "captions",
            ext.into(),
            [vec![k], body.as_bytes().to_vec()].concat(),
        ));
    }
    out
}
