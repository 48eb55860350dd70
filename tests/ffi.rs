//! The shared library as a host application uses it: loaded with `libloading`, every export
//! exercised, outputs compared with the Rust API, each bad input answered with a status code.
//! Also: the committed C header equals a fresh cbindgen run, a C program compiled against it
//! encodes a prompt, and Python's ctypes does the same.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::process::Command;

use common::*;
use libloading::{Library, Symbol};

const OK: i32 = 0;
const NULL_ARGUMENT: i32 = 1;
const INVALID_UTF8: i32 = 2;
const INVALID_ARGUMENT: i32 = 3;
const BUFFER_SIZE: i32 = 4;
const INVALID_HANDLE: i32 = 5;
const FILE_ERROR: i32 = 6;
const MISMATCH: i32 = 7;
const NON_FINITE: i32 = 8;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct Memory {
    cpu_bytes: u64,
    cuda_bytes: u64,
}

/// Where `cargo test` leaves the cdylib it built for this run: beside the test executable in
/// `deps/`. (`target/<profile>/libqwenclip.so` is only refreshed by `cargo build`, so on a
/// clean clone it does not exist and on a dev machine it may be stale.)
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn lib_path() -> PathBuf {
    lib_dir().join("libqwenclip.so")
}

struct Lib(Library);

type Load = unsafe extern "C" fn(*const c_char, *mut u64) -> i32;
type Free = unsafe extern "C" fn(u64) -> i32;
type LoadAdapter = unsafe extern "C" fn(u64, *const c_char) -> i32;
type Shape = unsafe extern "C" fn(u64, *mut usize, *mut usize, *mut usize) -> i32;
type Encode =
    unsafe extern "C" fn(u64, *const *const c_char, usize, *mut f32, usize, *mut f32, usize) -> i32;
type RunOpen = unsafe extern "C" fn(u64, *const c_char, *mut u64) -> i32;
type JsonOut = unsafe extern "C" fn(u64, *mut c_char, usize, *mut usize) -> i32;
type Supply = unsafe extern "C" fn(u64, *const f32, usize, *const f32, usize) -> i32;
type LossImage = unsafe extern "C" fn(u64, *mut u8, usize, *mut usize, *mut usize) -> i32;

impl Lib {
    fn open() -> Self {
        let p = lib_path();
        assert!(p.is_file(), "{} not built", p.display());
        Lib(unsafe { Library::new(&p) }.unwrap())
    }
    fn f<T>(&self, name: &str) -> Symbol<'_, T> {
        unsafe { self.0.get(name.as_bytes()) }
            .unwrap_or_else(|e| panic!("missing export {name}: {e}"))
    }
    fn last_error(&self) -> String {
        let f: Symbol<unsafe extern "C" fn() -> *const c_char> = self.f("qwenclip_last_error");
        unsafe { CStr::from_ptr(f()) }
            .to_string_lossy()
            .into_owned()
    }
    fn last_warning(&self) -> String {
        let f: Symbol<unsafe extern "C" fn() -> *const c_char> = self.f("qwenclip_last_warning");
        unsafe { CStr::from_ptr(f()) }
            .to_string_lossy()
            .into_owned()
    }
    fn load(&self, json: &str) -> Result<u64, (i32, String)> {
        let mut h = 0u64;
        let c = CString::new(json).unwrap();
        let s = unsafe { self.f::<Load>("qwenclip_encoder_load")(c.as_ptr(), &mut h) };
        if s == OK {
            Ok(h)
        } else {
            Err((s, self.last_error()))
        }
    }
    fn shape(&self, h: u64) -> Result<(usize, usize, usize), (i32, String)> {
        let (mut a, mut b, mut c) = (0, 0, 0);
        let s =
            unsafe { self.f::<Shape>("qwenclip_encoder_output_shape")(h, &mut a, &mut b, &mut c) };
        if s == OK {
            Ok((a, b, c))
        } else {
            Err((s, self.last_error()))
        }
    }
    fn encode(&self, h: u64, prompts: &[&str]) -> Result<(Vec<f32>, Vec<f32>), (i32, String)> {
        let (s, e, p) = self.shape(h)?;
        let cs: Vec<CString> = prompts.iter().map(|p| CString::new(*p).unwrap()).collect();
        let ptrs: Vec<*const c_char> = cs.iter().map(|c| c.as_ptr()).collect();
        let n = prompts.len();
        let mut emb = vec![0f32; n * s * e];
        let mut pooled = vec![0f32; n * p];
        let st = unsafe {
            self.f::<Encode>("qwenclip_encode")(
                h,
                ptrs.as_ptr(),
                n,
                emb.as_mut_ptr(),
                emb.len(),
                pooled.as_mut_ptr(),
                pooled.len(),
            )
        };
        if st == OK {
            Ok((emb, pooled))
        } else {
            Err((st, self.last_error()))
        }
    }
    fn free(&self, h: u64) -> i32 {
        unsafe { self.f::<Free>("qwenclip_encoder_free")(h) }
    }
}

fn tiny_json() -> String {
    let d = tiny();
    serde_json::json!({"model": d.join("model"), "adapter": d.join("adapter")}).to_string()
}

fn rust_encode(prompts: &[&str]) -> (Vec<f32>, Vec<f32>) {
    let d = tiny();
    let enc = qwenclip::Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        Default::default(),
    )
    .unwrap();
    let c = enc.encode(prompts).unwrap();
    (
        c.prompt_embeds.flatten_all().unwrap().to_vec1().unwrap(),
        c.pooled.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn version_capabilities_and_abi() {
    let lib = Lib::open();
    let v: Symbol<unsafe extern "C" fn() -> *const c_char> = lib.f("qwenclip_version");
    assert_eq!(
        unsafe { CStr::from_ptr(v()) }.to_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    let abi: Symbol<unsafe extern "C" fn() -> u32> = lib.f("qwenclip_abi_version");
    assert_eq!(unsafe { abi() }, 2);
    let caps: Symbol<unsafe extern "C" fn() -> u32> = lib.f("qwenclip_capabilities");
    let c = unsafe { caps() };
    assert_eq!(c & 1, 1, "cpu bit");
    assert_eq!(c & 2 != 0, cfg!(feature = "cuda"), "cuda bit");
}

#[test]
fn encode_through_the_c_abi_equals_the_rust_api() {
    let lib = Lib::open();
    let h = lib.load(&tiny_json()).unwrap();
    assert_eq!(lib.shape(h).unwrap(), (77, 2048, 1280));
    let prompts = ["a cat under a table", "", "the moon left of a lighthouse"];
    let (e, p) = lib.encode(h, &prompts).unwrap();
    let (re, rp) = rust_encode(&prompts);
    assert_eq!(e, re, "prompt embeds differ from the Rust API");
    assert_eq!(p, rp);
    assert_eq!(lib.last_warning(), "", "nothing was cut");
    assert_eq!(lib.free(h), OK);
}

#[test]
fn a_prompt_cut_at_the_token_limit_is_a_warning_not_an_error() {
    let lib = Lib::open();
    let d = tiny();
    let h = lib
        .load(
            &serde_json::json!({"model": d.join("model"), "adapter": d.join("adapter"), "max_tokens": 4})
                .to_string(),
        )
        .unwrap();
    lib.encode(
        h,
        &["short", "a red cube left of a blue sphere under a lamp"],
    )
    .unwrap();
    let w = lib.last_warning();
    assert!(
        w.contains("prompt 1 has") && w.contains("dropped (limit 4)") && !w.contains("prompt 0"),
        "{w}"
    );
    lib.shape(h).unwrap();
    assert_eq!(lib.last_warning(), "", "the next call clears it");
    assert_eq!(lib.free(h), OK);
}

#[test]
fn load_adapter_replaces_and_removes_without_reloading() {
    let lib = Lib::open();
    let d = tiny();
    let base = serde_json::json!({"model": d.join("model")}).to_string();
    let h = lib.load(&base).unwrap();
    let (s, msg) = lib.encode(h, &["x"]).unwrap_err();
    assert_eq!(s, INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("no resampler"), "{msg}");
    let la: Symbol<LoadAdapter> = lib.f("qwenclip_encoder_load_adapter");
    let dir = CString::new(d.join("adapter").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { la(h, dir.as_ptr()) }, OK);
    assert_eq!(lib.encode(h, &["x"]).unwrap(), rust_encode(&["x"]));
    // An adapter for another base is refused, and the current one stays.
    let other = CString::new(parity("models/mha_tied/lora").to_str().unwrap()).unwrap();
    assert_eq!(
        unsafe { la(h, other.as_ptr()) },
        MISMATCH,
        "{}",
        lib.last_error()
    );
    assert_eq!(lib.encode(h, &["x"]).unwrap(), rust_encode(&["x"]));
    assert_eq!(unsafe { la(h, std::ptr::null()) }, OK);
    assert_eq!(lib.shape(h).unwrap_err().0, INVALID_ARGUMENT);
    lib.free(h);
}

#[test]
fn offload_and_memory_report() {
    let lib = Lib::open();
    let h = lib.load(&tiny_json()).unwrap();
    let report: Symbol<unsafe extern "C" fn(*mut Memory) -> i32> = lib.f("qwenclip_memory_report");
    let mut m = Memory::default();
    assert_eq!(unsafe { report(&mut m) }, OK);
    assert!(
        m.cpu_bytes >= 4_900_000 * 4,
        "tiny model weights are counted: {m:?}"
    );
    let off: Symbol<Free> = lib.f("qwenclip_encoder_offload");
    assert_eq!(unsafe { off(h) }, OK);
    let mut after = Memory::default();
    unsafe { report(&mut after) };
    assert!(
        after.cpu_bytes + 4_900_000 * 4 <= m.cpu_bytes,
        "offloaded weights are released: {m:?} -> {after:?}"
    );
    // The next encode reloads, with the same adapter.
    assert_eq!(lib.encode(h, &["y"]).unwrap(), rust_encode(&["y"]));
    let release: Symbol<unsafe extern "C" fn() -> i32> = lib.f("qwenclip_release_memory");
    assert_eq!(unsafe { release() }, OK);
    assert_eq!(unsafe { report(std::ptr::null_mut()) }, NULL_ARGUMENT);
    lib.free(h);
}

#[test]
fn bad_inputs_return_codes_never_crash() {
    let lib = Lib::open();
    let mut h = 0u64;
    let load: Symbol<Load> = lib.f("qwenclip_encoder_load");
    assert_eq!(unsafe { load(std::ptr::null(), &mut h) }, NULL_ARGUMENT);
    let json = CString::new(tiny_json()).unwrap();
    assert_eq!(
        unsafe { load(json.as_ptr(), std::ptr::null_mut()) },
        NULL_ARGUMENT
    );
    let bad_utf8 = [0xffu8, 0xfe, 0];
    assert_eq!(
        unsafe { load(bad_utf8.as_ptr() as *const c_char, &mut h) },
        INVALID_UTF8
    );
    assert_eq!(lib.load("{not json").unwrap_err().0, INVALID_ARGUMENT);
    // Hosts build the JSON: a syntax error quotes the text around it (here a NaN, which JSON
    // cannot carry, as Python's json.dumps writes it).
    let (s, msg) = lib
        .load(r#"{"model": "m", "max_tokens": 77, "dtype": "f32", "hidden_layer": NaN}"#)
        .unwrap_err();
    assert!(
        s == INVALID_ARGUMENT && msg.contains("near `") && msg.contains("\"hidden_layer\": NaN"),
        "{msg}"
    );
    let (s, msg) = lib.load(r#"{"model": "x", "devise": "cpu"}"#).unwrap_err();
    assert!(s == INVALID_ARGUMENT && msg.contains("devise"), "{msg}");
    let (s, msg) = lib.load(r#"{"model": "/nonexistent/model"}"#).unwrap_err();
    assert!(
        s == FILE_ERROR && msg.contains("/nonexistent/model"),
        "{msg}"
    );
    let (s, msg) = lib
        .load(&serde_json::json!({"model": tiny().join("model"), "dtype": "f8"}).to_string())
        .unwrap_err();
    assert!(s == INVALID_ARGUMENT && msg.contains("dtype"), "{msg}");
    let (s, msg) = lib.load(&serde_json::json!({"model": tiny().join("model"), "adapter": parity("models/mha_tied/lora")}).to_string()).unwrap_err();
    assert!(s == MISMATCH, "{msg}");

    let h = lib.load(&tiny_json()).unwrap();
    let encode: Symbol<Encode> = lib.f("qwenclip_encode");
    let p = CString::new("hi").unwrap();
    let ptrs = [p.as_ptr()];
    let mut e = vec![0f32; 77 * 2048];
    let mut pooled = vec![0f32; 1280];
    unsafe {
        assert_eq!(
            encode(
                h,
                ptrs.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len() - 1,
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            BUFFER_SIZE
        );
        assert!(
            lib.last_error()
                .contains("157695 floats, 157696 are needed"),
            "{}",
            lib.last_error()
        );
        assert_eq!(
            encode(
                h,
                ptrs.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len() + 1
            ),
            BUFFER_SIZE
        );
        assert_eq!(
            encode(
                h,
                ptrs.as_ptr(),
                1,
                std::ptr::null_mut(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            NULL_ARGUMENT
        );
        assert_eq!(
            encode(
                h,
                std::ptr::null(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            NULL_ARGUMENT
        );
        assert_eq!(
            encode(
                h,
                ptrs.as_ptr(),
                0,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            INVALID_ARGUMENT
        );
        let nul_prompt = [std::ptr::null::<c_char>()];
        assert_eq!(
            encode(
                h,
                nul_prompt.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            NULL_ARGUMENT
        );
        let bad = [bad_utf8.as_ptr() as *const c_char];
        assert_eq!(
            encode(
                h,
                bad.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            INVALID_UTF8
        );
        assert!(
            lib.last_error().contains("prompts[0]"),
            "{}",
            lib.last_error()
        );
        // Handles: unknown, zero, wrong kind, freed, double-freed.
        assert_eq!(
            encode(
                h + 1000,
                ptrs.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            INVALID_HANDLE
        );
        assert!(
            lib.last_error().contains("never issued"),
            "{}",
            lib.last_error()
        );
        assert_eq!(
            encode(
                0,
                ptrs.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            INVALID_HANDLE
        );
        let rfree: Symbol<Free> = lib.f("qwenclip_run_free");
        assert_eq!(
            rfree(h),
            INVALID_HANDLE,
            "an encoder handle is not a run handle"
        );
        assert!(
            lib.last_error().contains("not a handle of this kind"),
            "{}",
            lib.last_error()
        );
        assert_eq!(lib.free(h), OK);
        assert_eq!(
            encode(
                h,
                ptrs.as_ptr(),
                1,
                e.as_mut_ptr(),
                e.len(),
                pooled.as_mut_ptr(),
                pooled.len()
            ),
            INVALID_HANDLE
        );
        assert!(
            lib.last_error().contains("already freed"),
            "{}",
            lib.last_error()
        );
        assert_eq!(lib.free(h), INVALID_HANDLE);
    }
    // A success clears the message.
    let h = lib.load(&tiny_json()).unwrap();
    assert_eq!(lib.last_error(), "");
    lib.free(h);
}

#[test]
fn concurrent_encodes_equal_serial_ones() {
    let lib = Lib::open();
    let h = lib.load(&tiny_json()).unwrap();
    let prompts: Vec<String> = (0..6)
        .map(|i| {
            format!(
                "prompt number {i}: a {} bird",
                ["red", "blue", "green"][i % 3]
            )
        })
        .collect();
    let serial: Vec<_> = prompts
        .iter()
        .map(|p| lib.encode(h, &[p.as_str()]).unwrap())
        .collect();
    let lib = &lib;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let prompts = &prompts;
                let serial = &serial;
                s.spawn(move || {
                    for m in 0..3 {
                        let i = (t + m) % prompts.len();
                        assert_eq!(
                            &lib.encode(h, &[prompts[i].as_str()]).unwrap(),
                            &serial[i],
                            "thread {t} encode {m}"
                        );
                    }
                })
            })
            .collect();
        for j in handles {
            j.join().unwrap();
        }
    });
    lib.free(h);
}

/// A JSON document from one of the exports that fill a caller buffer (size first, then data).
fn json_call(lib: &Lib, f: impl Fn(*mut c_char, usize, *mut usize) -> i32) -> serde_json::Value {
    let mut needed = 0usize;
    assert_eq!(
        f(std::ptr::null_mut(), 0, &mut needed),
        OK,
        "{}",
        lib.last_error()
    );
    let mut small = vec![0u8; needed - 1];
    assert_eq!(
        f(small.as_mut_ptr() as *mut c_char, small.len(), &mut needed),
        BUFFER_SIZE,
        "a buffer one byte short is refused"
    );
    let mut buf = vec![0u8; needed];
    assert_eq!(
        f(buf.as_mut_ptr() as *mut c_char, buf.len(), &mut needed),
        OK
    );
    let text = CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap();
    serde_json::from_str(text).unwrap()
}

const RUN_DIMS: qwenclip::training::TargetDims = qwenclip::training::TargetDims {
    seq: 77,
    embed: 24,
    pooled: 8,
};

/// A stand-in teacher: fixed random targets per caption (seeded by the caption's bytes).
fn oracle(captions: &[String]) -> (Vec<f32>, Vec<f32>) {
    let (mut e, mut p) = (Vec::new(), Vec::new());
    for c in captions {
        let seed = c
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = qwenclip::rng::Rng::new(seed);
        e.extend(rng.normal_vec(RUN_DIMS.seq * RUN_DIMS.embed, 1.0));
        p.extend(rng.normal_vec(RUN_DIMS.pooled, 1.0));
    }
    (e, p)
}

const RUN_CAPTIONS: &str = "a cat\n# a comment\na dog\na red cube\na blue sphere\na green cone\na yellow star\na house\na tree\n";

fn run_settings() -> serde_json::Value {
    serde_json::json!({
        "lora_r": 4, "lora_alpha": 8, "resampler_width": 32, "resampler_heads": 4,
        "resampler_layers": 1, "resampler_ff_mult": 2, "grad_accum": 2, "batch_size": 2,
        "steps": 6, "save_every": 3, "eval_every": 2, "held_out": 0.25, "warmup_steps": 1,
    })
}

#[test]
fn a_training_run_through_the_c_abi_equals_the_rust_run_and_resumes_exactly() {
    let lib = Lib::open();
    let d = tiny();
    let h = lib
        .load(&serde_json::json!({"model": d.join("model")}).to_string())
        .unwrap();
    let defaults: Symbol<unsafe extern "C" fn(*mut c_char, usize, *mut usize) -> i32> =
        lib.f("qwenclip_train_defaults");
    let got = json_call(&lib, |b, l, n| unsafe { defaults(b, l, n) });
    assert_eq!(
        got,
        serde_json::to_value(qwenclip::training::TrainConfig::default()).unwrap(),
        "the defaults a host reads are the library's"
    );

    let open: Symbol<RunOpen> = lib.f("qwenclip_run_open");
    let state: Symbol<JsonOut> = lib.f("qwenclip_run_state");
    let supply: Symbol<Supply> = lib.f("qwenclip_run_supply");
    let save: Symbol<Free> = lib.f("qwenclip_run_save");
    let free: Symbol<Free> = lib.f("qwenclip_run_free");
    let loss_image: Symbol<LossImage> = lib.f("qwenclip_run_loss_image");
    let spec = |out: &std::path::Path, settings: serde_json::Value| {
        CString::new(
            serde_json::json!({
                "out": out, "captions": {"text": RUN_CAPTIONS}, "settings": settings,
                "dims": {"seq": 77, "embed": 24, "pooled": 8},
            })
            .to_string(),
        )
        .unwrap()
    };
    let open_run = |out: &std::path::Path| -> u64 {
        let mut r = 0u64;
        let c = spec(out, run_settings());
        assert_eq!(
            unsafe { open(h, c.as_ptr(), &mut r) },
            OK,
            "{}",
            lib.last_error()
        );
        r
    };
    let state_of = |r: u64| json_call(&lib, |b, l, n| unsafe { state(r, b, l, n) });
    let feed = |r: u64| -> serde_json::Value {
        let st = state_of(r);
        let caps: Vec<String> = serde_json::from_value(st["captions"].clone()).unwrap();
        let (e, p) = oracle(&caps);
        let s = unsafe { supply(r, e.as_ptr(), e.len(), p.as_ptr(), p.len()) };
        assert_eq!(s, OK, "{}", lib.last_error());
        state_of(r)
    };

    // Through the C ABI: three steps, a save (the host's Cancel), free, open again, the rest.
    let split = scratch("ffi-run-split");
    let _ = std::fs::remove_dir_all(&split);
    let r = open_run(&split);
    let first = state_of(r);
    assert_eq!(first["caption_count"], 8, "comments are not captions");
    assert_eq!(first["need"], "baseline");
    while state_of(r)["step"] != 3 {
        feed(r);
    }
    assert_eq!(unsafe { save(r) }, OK, "{}", lib.last_error());
    assert_eq!(unsafe { free(r) }, OK);
    assert_eq!(unsafe { free(r) }, INVALID_HANDLE);
    let r = open_run(&split);
    assert_eq!(
        state_of(r)["step"],
        3,
        "opening the folder again resumes it"
    );
    let mut events = Vec::new();
    while state_of(r)["done"] == false {
        events.extend(feed(r)["events"].as_array().unwrap().clone());
    }
    assert!(events.iter().any(|e| e["kind"] == "eval"), "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["kind"] == "saved" && e["step"] == 6));
    let (mut w, mut ht) = (0usize, 0usize);
    assert_eq!(
        unsafe { loss_image(r, std::ptr::null_mut(), 0, &mut w, &mut ht) },
        OK
    );
    let mut rgb = vec![0u8; w * ht * 3];
    assert_eq!(
        unsafe { loss_image(r, rgb.as_mut_ptr(), rgb.len(), &mut w, &mut ht) },
        OK
    );
    assert!(
        rgb.chunks(3).any(|px| px == [30, 90, 200]),
        "the picture shows the training loss"
    );
    let (e, p) = oracle(&["x".to_string()]);
    assert_eq!(
        unsafe { supply(r, e.as_ptr(), e.len(), p.as_ptr(), p.len()) },
        INVALID_ARGUMENT,
        "a finished run takes no more targets"
    );
    assert_eq!(unsafe { free(r) }, OK);

    // The same run through the Rust API, uninterrupted: the same adapter, bit for bit.
    let straight = scratch("ffi-run-straight");
    let _ = std::fs::remove_dir_all(&straight);
    let set = qwenclip::data::load_caption_sources(&[], Some(RUN_CAPTIONS), None).unwrap();
    let enc = qwenclip::Encoder::load(&d.join("model"), None, Default::default()).unwrap();
    let mut run = qwenclip::training::Run::open(
        enc,
        set.captions.clone(),
        qwenclip::training::RunSpec {
            out: straight.clone(),
            settings: run_settings(),
            dims: RUN_DIMS,
            resume: qwenclip::training::Resume::Never,
            judge: qwenclip::training::vision::Judging::None,
        },
    )
    .unwrap();
    qwenclip::training::run::drive(
        &mut run,
        &mut |req| {
            let caps: Vec<String> = req
                .indices
                .iter()
                .map(|&i| set.captions[i].clone())
                .collect();
            let (e, p) = oracle(&caps);
            let n = req.indices.len();
            Ok((
                candle_core::Tensor::from_vec(e, (n, 77, 24), &candle_core::Device::Cpu)?,
                candle_core::Tensor::from_vec(p, (n, 8), &candle_core::Device::Cpu)?,
            ))
        },
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    for f in ["adapter_model.safetensors", "resampler.safetensors"] {
        let a = std::fs::read(straight.join("adapter").join(f)).unwrap();
        let b = std::fs::read(split.join("adapter").join(f)).unwrap();
        assert!(
            a == b,
            "{f}: the resumed C ABI run differs from the straight Rust run"
        );
    }

    // Bad input: an unknown setting, targets of the wrong size, NaN targets.
    let other = scratch("ffi-run-bad");
    let _ = std::fs::remove_dir_all(&other);
    let mut r = 0u64;
    let bad = spec(&other, serde_json::json!({"lora_rank": 4}));
    assert_eq!(unsafe { open(h, bad.as_ptr(), &mut r) }, INVALID_ARGUMENT);
    assert!(
        lib.last_error().contains("lora_rank"),
        "{}",
        lib.last_error()
    );
    let nan_lr = spec(&other, serde_json::json!({"lr_lora": f64::NAN.to_string()}));
    assert_eq!(
        unsafe { open(h, nan_lr.as_ptr(), &mut r) },
        INVALID_ARGUMENT
    );
    let r = open_run(&other);
    let caps: Vec<String> = serde_json::from_value(state_of(r)["captions"].clone()).unwrap();
    let (e, p) = oracle(&caps);
    assert_eq!(
        unsafe { supply(r, e.as_ptr(), e.len() - 1, p.as_ptr(), p.len()) },
        BUFFER_SIZE
    );
    while state_of(r)["need"] != "train" {
        feed(r);
    }
    let caps: Vec<String> = serde_json::from_value(state_of(r)["captions"].clone()).unwrap();
    let (e, p) = oracle(&caps);
    let nan = vec![f32::NAN; e.len()];
    assert_eq!(
        unsafe { supply(r, nan.as_ptr(), nan.len(), p.as_ptr(), p.len()) },
        NON_FINITE
    );
    assert_eq!(
        state_of(r)["captions"],
        serde_json::json!(caps),
        "after a refused batch the same captions are asked for again"
    );
    assert_eq!(unsafe { free(r) }, OK);
    lib.free(h);
}

#[test]
fn committed_header_equals_a_fresh_cbindgen_run() {
    let root = root();
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    // cbindgen follows the `mod` declarations of src/ffi/mod.rs.
    let builder = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"));
    let mut fresh = Vec::new();
    builder.generate().unwrap().write(&mut fresh);
    let path = root.join("include/qwenclip.h");
    if std::env::var_os("QWENCLIP_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(committed == fresh, "include/qwenclip.h differs from what cbindgen generates: run `QWENCLIP_BLESS=1 cargo test --test ffi` and commit it");
    let text = String::from_utf8(fresh).unwrap();
    for f in [
        "qwenclip_encode(",
        "qwenclip_run_supply(",
        "qwenclip_encoder_load_adapter(",
        "qwenclip_last_error(",
        "qwenclip_memory_report(",
    ] {
        assert!(text.contains(f), "header lacks {f}");
    }
}

#[test]
fn a_c_program_compiled_against_the_header_encodes_a_prompt() {
    let out = scratch("ffi-c");
    let exe = out.join("encode_c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(root().join("tests/ffi/encode.c"))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-L")
        .arg(lib_dir())
        .args(["-lqwenclip", "-Wl,-rpath"])
        .arg(lib_dir())
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(
        status.success(),
        "the C program does not compile against include/qwenclip.h"
    );
    let d = tiny();
    // cargo's LD_LIBRARY_PATH lists target/debug before deps/: a library left there by an
    // earlier `cargo build` would shadow the one this run built.
    let o = Command::new(&exe)
        .env("LD_LIBRARY_PATH", lib_dir())
        .arg(d.join("model"))
        .arg(d.join("adapter"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (e, p) = rust_encode(&["a lighthouse under the stars"]);
    let want = format!(
        "shape 77 2048 1280 first {:.6} last {:.6} pooled0 {:.6}",
        e[0],
        e[e.len() - 1],
        p[0]
    );
    assert!(
        stdout.contains(&want),
        "C output {stdout:?} does not contain {want:?}"
    );
}

#[test]
fn bench_ffi_measures_the_shared_library_against_the_rust_api() {
    let d = tiny();
    let stdout = stdout_of(
        Command::new(env!("CARGO_BIN_EXE_qwenclip-dev"))
            .args(["bench-ffi", "--reps", "3", "--model"])
            .arg(d.join("model"))
            .arg("--adapter")
            .arg(d.join("adapter"))
            .arg("--lib")
            .arg(lib_path()),
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["outputs_equal"], true, "{report}");
    assert_eq!(report["library"], lib_path().to_str().unwrap(), "{report}");
}

#[test]
fn python_ctypes_encodes_a_prompt() {
    let d = tiny();
    let o = Command::new("python3")
        .arg(root().join("tests/ffi/ctypes_smoke.py"))
        .arg(lib_path())
        .arg(d.join("model"))
        .arg(d.join("adapter"))
        .output()
        .expect("python3 is needed for this test");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (e, p) = rust_encode(&["a lighthouse under the stars", ""]);
    let want = format!("ok 2 {:.6} {:.6}", e[77 * 2048], p[1280 + 5]);
    assert!(
        stdout.contains(&want),
        "python output {stdout:?} does not contain {want:?}"
    );
}

#[test]
fn the_run_judge_is_named_and_the_host_judged_calls_check_what_the_run_asks() {
    let lib = Lib::open();
    let d = tiny();
    let h = lib
        .load(&serde_json::json!({"model": d.join("model")}).to_string())
        .unwrap();
    let open: Symbol<RunOpen> = lib.f("qwenclip_run_open");
    let state: Symbol<JsonOut> = lib.f("qwenclip_run_state");
    let free: Symbol<Free> = lib.f("qwenclip_run_free");
    type Cond = unsafe extern "C" fn(u64, *mut f32, usize, *mut f32, usize) -> i32;
    let conditioning: Symbol<Cond> = lib.f("qwenclip_run_conditioning");
    let out = scratch("ffi-run-judge");
    let _ = std::fs::remove_dir_all(&out);
    let spec = |judge: serde_json::Value| {
        let mut settings = run_settings();
        settings["objective"] = "vision".into();
        CString::new(
            serde_json::json!({
                "out": out, "captions": {"text": RUN_CAPTIONS}, "settings": settings,
                "dims": {"seq": 77, "embed": 24, "pooled": 8}, "judge": judge,
            })
            .to_string(),
        )
        .unwrap()
    };
    let mut r = 0u64;
    for (judge, says) in [
        (serde_json::json!("nobody"), "expected \"host\""),
        (serde_json::json!({"unet": out.join("missing")}), "missing"),
        (serde_json::Value::Null, "needs the SDXL UNet"),
    ] {
        let c = spec(judge);
        assert_ne!(unsafe { open(h, c.as_ptr(), &mut r) }, OK);
        assert!(lib.last_error().contains(says), "{}", lib.last_error());
    }
    let c = spec(serde_json::json!("host"));
    assert_eq!(
        unsafe { open(h, c.as_ptr(), &mut r) },
        OK,
        "{}",
        lib.last_error()
    );
    let st = json_call(&lib, |b, l, n| unsafe { state(r, b, l, n) });
    assert_eq!(
        (st["judge"].as_str(), st["need"].as_str()),
        (Some("host"), Some("baseline"))
    );
    assert!(st["trajectory"].is_null());
    let (mut e, mut p) = (vec![0f32; 77 * 24], vec![0f32; 8]);
    let status = unsafe { conditioning(r, e.as_mut_ptr(), e.len(), p.as_mut_ptr(), p.len()) };
    assert_ne!(status, OK);
    assert!(
        lib.last_error().contains("Baseline"),
        "{}",
        lib.last_error()
    );
    assert_eq!(unsafe { free(r) }, OK);
}

type EncodeWeighted = unsafe extern "C" fn(
    u64,
    *const *const c_char,
    usize,
    *const c_char,
    *mut f32,
    usize,
    *mut f32,
    usize,
) -> i32;
type PromptWeights =
    unsafe extern "C" fn(*const c_char, *const c_char, *mut c_char, usize, *mut usize) -> i32;

#[test]
fn weighted_prompts_through_the_c_abi_equal_the_rust_api_and_bad_weights_name_the_span() {
    let lib = Lib::open();
    let h = lib.load(&tiny_json()).unwrap();
    let (s, e, p) = lib.shape(h).unwrap();
    let encode = |prompt: &str, syntax: Option<&str>| -> Result<Vec<f32>, (i32, String)> {
        let c = CString::new(prompt).unwrap();
        let ptrs = [c.as_ptr()];
        let syn = syntax.map(|x| CString::new(x).unwrap());
        let mut emb = vec![0f32; s * e];
        let mut pooled = vec![0f32; p];
        let st = unsafe {
            lib.f::<EncodeWeighted>("qwenclip_encode_weighted")(
                h,
                ptrs.as_ptr(),
                1,
                syn.as_ref().map_or(std::ptr::null(), |x| x.as_ptr()),
                emb.as_mut_ptr(),
                emb.len(),
                pooled.as_mut_ptr(),
                pooled.len(),
            )
        };
        if st == OK {
            Ok(emb)
        } else {
            Err((st, lib.last_error()))
        }
    };
    let d = tiny();
    let enc = qwenclip::Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        Default::default(),
    )
    .unwrap();
    let prompt = "a (red:1.5) cube left of a [blue] sphere";
    for (syntax, parsed) in [
        ("comfy", qwenclip::tokenizer::syntax::PromptSyntax::Comfy),
        ("a1111", qwenclip::tokenizer::syntax::PromptSyntax::A1111),
    ] {
        let want: Vec<f32> = enc
            .encode_with(&[prompt], parsed)
            .unwrap()
            .prompt_embeds
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(encode(prompt, Some(syntax)).unwrap(), want, "{syntax}");
    }
    // NULL and "none" are plain text, as qwenclip_encode
    let plain = lib.encode(h, &[prompt]).unwrap().0;
    assert_eq!(encode(prompt, None).unwrap(), plain);
    assert_eq!(encode(prompt, Some("none")).unwrap(), plain);
    let (st, msg) = encode(prompt, Some("markdown")).unwrap_err();
    assert!(
        st == INVALID_ARGUMENT && msg.contains("\"markdown\""),
        "{msg}"
    );
    let (st, msg) = encode("a (red:lots) cube", Some("comfy")).unwrap_err();
    assert!(
        st == INVALID_ARGUMENT && msg.contains("(red:lots)") && msg.contains("not a number"),
        "{msg}"
    );

    let syntax = CString::new("comfy").unwrap();
    let text = CString::new(r"a ((red)) \(cube\)").unwrap();
    let doc = json_call(&lib, |b, n, need| unsafe {
        lib.f::<PromptWeights>("qwenclip_prompt_weights")(
            syntax.as_ptr(),
            text.as_ptr(),
            b,
            n,
            need,
        )
    });
    assert_eq!(doc["text"], "a red (cube)");
    let segs = doc["segments"].as_array().unwrap();
    assert_eq!(segs[1][0], "red");
    assert!((segs[1][1].as_f64().unwrap() - 1.1 * 1.1).abs() < 1e-12);
    lib.free(h);
}
