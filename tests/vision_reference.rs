//! One vision-distillation step of the training run against a PyTorch reference of the same
//! step (`tests/fixtures/vision/`, made by `tests/reference/make_vision_step_fixture.py`):
//! same tiny weights, same noise, same guidance; the loss and every LoRA and resampler
//! gradient within 1e-4 relative.
//!
//! The step goes through the run's own code path (`Run::supply` -> the vision step ->
//! `Trainer::step_with`), with `grad_accum` 4 so that the gradient of each micro-step can be
//! read off the accumulated one before any optimizer step: trajectory step 0 (from the
//! noise) and step 1 (from the latents the teacher's guided prediction moved to).
//!
//! Relative error of a tensor: `max |got - want| / max |want|`, in f64.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use qwenclip::ops::blas;
use qwenclip::training::run::{Need, Resume, Run, RunSpec};
use qwenclip::training::vision::{Judge, Judging, SamplerKind, Trajectory};
use qwenclip::training::TargetDims;
use qwenclip::{Encoder, EncoderOptions, ForwardMode, LoraMode};
use sha2::{Digest, Sha256};

/// The bound the issue sets on the loss and on every gradient.
const REL: f64 = 1e-4;

fn dir() -> PathBuf {
    root().join("tests/fixtures/vision")
}

fn unet_dir() -> PathBuf {
    root().join("tests/fixtures/unet/diffusers/unet")
}

struct Fixture {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let path = dir().join("step.safetensors");
        let meta = qwenclip::formats::safetensors::read_metadata(&path).unwrap();
        let meta = serde_json::from_str(&meta["qwenclip.vision_step"]).unwrap();
        Fixture {
            t: load(&path),
            meta,
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("the fixture has no {name}"))
    }

    fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap() as usize
    }

    fn captions(&self) -> Vec<String> {
        serde_json::from_value(self.meta["captions"].clone()).unwrap()
    }

    fn batch(&self) -> Vec<usize> {
        serde_json::from_value(self.meta["batch"].clone()).unwrap()
    }

    fn guidance(&self) -> Vec<f64> {
        self.get("guidance").to_vec1::<f64>().unwrap()
    }

    fn teacher(&self) -> (&Tensor, &Tensor) {
        (self.get("teacher_embeds"), self.get("teacher_pooled"))
    }

    fn uncond(&self) -> (&Tensor, &Tensor) {
        (self.get("uncond_embeds"), self.get("uncond_pooled"))
    }

    /// The reference's gradient of trajectory step `k`, by the trainer's parameter names.
    fn grads(&self, k: usize) -> BTreeMap<String, Tensor> {
        let prefix = format!("step{k}.grad.");
        self.t
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix(&prefix)?.to_string(), t.clone())))
            .collect()
    }
}

fn sha256_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The base model (the library's seeded generator) and the judge are the ones the reference
/// used: anything else would fail below for a reason that has nothing to do with the step.
fn check_weights(f: &Fixture) -> PathBuf {
    assert_eq!(f.usize("base_seed"), 0, "common::tiny() writes seed 0");
    let base = tiny().join("model");
    assert_eq!(
        sha256_of(&base.join("model.safetensors")),
        f.meta["base_model_sha256"].as_str().unwrap(),
        "qwenclip::dev::tiny now writes another tiny Qwen3 than the one the reference used: \
         rerun tests/reference/make_vision_step_fixture.py"
    );
    assert_eq!(
        sha256_of(&unet_dir().join("diffusion_pytorch_model.fp16.safetensors")),
        f.meta["unet_sha256"].as_str().unwrap(),
        "tests/fixtures/unet was regenerated: rerun tests/reference/make_vision_step_fixture.py"
    );
    base
}

fn student(base: &Path) -> Encoder {
    let opts = EncoderOptions {
        lora_mode: LoraMode::Unmerged,
        ..Default::default()
    };
    Encoder::load(base, Some(&dir().join("adapter")), opts).unwrap()
}

fn judge() -> Judge {
    Judge::load(&unet_dir(), None, None, DType::F32, &Device::Cpu).unwrap()
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn max_abs64(t: &Tensor) -> f64 {
    f64_of(t)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `max |got - want| / max |want|`.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    max_abs64(&(f64_of(got) - f64_of(want)).unwrap()) / max_abs64(want)
}

fn assert_rel(what: &str, got: &Tensor, want: &Tensor, rel: f64) -> f64 {
    let e = rel_err(got, want);
    assert!(e <= rel, "{what}: relative error {e:e} > {rel:e}");
    e
}

/// The student's conditioning at the starting weights, and the judge's side of both steps
/// (the teacher's and the student's predictions, the next latents), each against the
/// reference: a mismatch in the run is then not in these parts.
fn check_parts(f: &Fixture, base: &Path) {
    let captions = f.captions();
    let prompts: Vec<&str> = f.batch().iter().map(|&i| captions[i].as_str()).collect();
    let enc = student(base);
    let tokens = enc.tokenize(&prompts).unwrap();
    let want_ids: Vec<Vec<u32>> = f
        .get("input_ids")
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want_mask: Vec<Vec<u8>> = f
        .get("attention_mask")
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(tokens.ids, want_ids, "token ids");
    assert_eq!(tokens.mask, want_mask, "attention mask");
    let c = enc.encode(&prompts).unwrap();
    let e = assert_rel(
        "student embeds",
        &c.prompt_embeds,
        f.get("student_embeds"),
        REL,
    );
    let p = assert_rel("student pooled", &c.pooled, f.get("student_pooled"), REL);
    eprintln!("student conditioning: embeds {e:.2e}, pooled {p:.2e}");

    let j = judge();
    let sampler = j
        .sampler(SamplerKind::Euler, f.usize("denoise_steps"))
        .unwrap();
    let sigma = f.meta["init_noise_sigma"].as_f64().unwrap();
    assert!((sampler.init_noise_sigma() - sigma).abs() <= 1e-6 * sigma);
    let time_ids = j.time_ids(2, f.usize("resolution")).unwrap();
    assert_eq!(max_diff(&time_ids, f.get("time_ids")), 0.0, "size ids");
    for k in 0..f.usize("steps_checked") {
        let x = f.get(&format!("step{k}.latents"));
        let (eps, next) = j
            .teacher_step(
                sampler.as_ref(),
                k,
                x,
                &time_ids,
                f.teacher(),
                f.uncond(),
                &f.guidance(),
            )
            .unwrap();
        let student = j
            .predict(
                sampler.as_ref(),
                k,
                x,
                &time_ids,
                (f.get("student_embeds"), f.get("student_pooled")),
                ForwardMode::Differentiable,
            )
            .unwrap();
        let at = |n: &str| format!("step{k}.{n}");
        let e = [
            assert_rel(&at("eps_teacher"), &eps, f.get(&at("eps_teacher")), REL),
            assert_rel(&at("eps_student"), &student, f.get(&at("eps_student")), REL),
            assert_rel(&at("next_latents"), &next, f.get(&at("next_latents")), REL),
        ];
        eprintln!(
            "step {k}: teacher eps {:.2e}, student eps {:.2e}, next latents {:.2e}",
            e[0], e[1], e[2]
        );
    }
}

/// What the run did in one micro-step.
struct Micro {
    loss: f64,
    loss_vision: f64,
    acc: BTreeMap<String, Tensor>,
    trajectory: Trajectory,
}

/// Opens the run on the fixture's captions and settings and trains `n` micro-steps,
/// answering its requests with the fixture's targets.
fn run_micro_steps(f: &Fixture, base: &Path, n: usize) -> Vec<Micro> {
    let (te, tp) = f.teacher();
    let out = scratch("vision-reference-run");
    let _ = std::fs::remove_dir_all(&out);
    let mut run = Run::open(
        student(base),
        f.captions(),
        RunSpec {
            out,
            settings: f.meta["settings"].clone(),
            dims: TargetDims {
                seq: te.dim(1).unwrap(),
                embed: te.dim(2).unwrap(),
                pooled: tp.dim(1).unwrap(),
            },
            resume: Resume::Never,
            judge: Judging::Unet(Box::new(judge())),
        },
    )
    .unwrap();
    let mut micro = Vec::new();
    while micro.len() < n {
        let req = run.request().expect("the run wants more").clone();
        match req.need {
            Need::Empty => {
                let (e, p) = f.uncond();
                assert!(run.supply(e, p).unwrap().is_empty());
            }
            Need::Train => {
                assert_eq!(req.indices, f.batch(), "the run drew another batch");
                let events = run.supply(te, tp).unwrap();
                assert!(
                    events.is_empty(),
                    "an optimizer step came early: {events:?}"
                );
                let report = run.micro_reports().last().unwrap().clone();
                micro.push(Micro {
                    loss: report.loss,
                    loss_vision: report.parts["loss_vision"],
                    acc: run.trainer().accumulated_gradient().clone(),
                    trajectory: run.trajectory().unwrap().clone(),
                });
            }
            other => panic!("unexpected request {other:?}"),
        }
    }
    assert_eq!(run.step(), 0);
    micro
}

#[test]
fn one_vision_step_matches_the_pytorch_reference() {
    if blas::get().is_none() {
        assert!(
            std::env::var_os("QWENCLIP_REQUIRE_BLAS").is_none(),
            "QWENCLIP_REQUIRE_BLAS is set but no system BLAS was loaded"
        );
        eprintln!("no system BLAS: the fallback kernels run");
    }
    let f = Fixture::load();
    let base = check_weights(&f);
    check_parts(&f, &base);

    let steps = f.usize("steps_checked");
    let grad_accum = f.meta["settings"]["grad_accum"].as_u64().unwrap();
    assert!(grad_accum as usize > steps);
    let micro = run_micro_steps(&f, &base, steps);

    // The run followed the reference's trajectory: its seed, guidance and noise.
    let t = &micro[0].trajectory;
    assert_eq!(
        t.seed.to_string(),
        f.meta["noise_seed"].as_str().unwrap(),
        "noise seed"
    );
    assert_eq!(t.guidance, f.guidance(), "guidance per sample");
    assert!(
        t.guidance[0] != t.guidance[1],
        "the two samples share a guidance scale"
    );
    assert_eq!((t.resolution, t.step), (f.usize("resolution"), 1));
    let j = judge();
    let sampler = j.sampler(t.sampler, t.denoise_steps).unwrap();
    let start = Trajectory {
        step: 0,
        ..t.clone()
    };
    let noise = start
        .noise(
            j.latent_shape(2, t.resolution),
            sampler.init_noise_sigma(),
            &Device::Cpu,
        )
        .unwrap();
    assert_rel("starting noise", &noise, f.get("noise"), 1e-6);
    assert_eq!(micro[1].trajectory.step, 2);

    // The loss and the gradient of each step. The trainer accumulates gradient / grad_accum;
    // step k's own is the difference of the accumulations after and before it.
    let scale = grad_accum as f64;
    let mut worst = (0.0, String::new());
    for (k, m) in micro.iter().enumerate() {
        let want = f.get(&format!("step{k}.loss")).to_vec1::<f64>().unwrap()[0];
        for (what, got) in [("loss", m.loss), ("loss_vision", m.loss_vision)] {
            let e = (got - want).abs() / want.abs();
            eprintln!("step {k} {what}: {got} vs {want} (relative error {e:.2e})");
            assert!(e <= REL, "step {k} {what}: {got} vs {want}: {e:e}");
        }
        let reference = f.grads(k);
        assert_eq!(
            m.acc.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "the trained parameters are not the reference's"
        );
        let (mut lora, mut resampler) = (0.0f64, 0.0f64);
        for (name, want) in &reference {
            let got = match k {
                0 => &m.acc[name] * scale,
                _ => (&m.acc[name] - &micro[k - 1].acc[name]).and_then(|d| d * scale),
            }
            .unwrap();
            let e = assert_rel(&format!("step {k} gradient of {name}"), &got, want, REL);
            let slot = if name.starts_with("lora.") {
                &mut lora
            } else {
                &mut resampler
            };
            *slot = slot.max(e);
            if e > worst.0 {
                worst = (e, format!("step {k} {name}"));
            }
        }
        eprintln!(
            "step {k}: {} gradients, worst relative error: LoRA {lora:.2e}, resampler {resampler:.2e}",
            reference.len()
        );
    }
    eprintln!("worst gradient: {} ({:.2e})", worst.1, worst.0);
}
