//! Vision-based distillation end to end on tiny models: tiny SDXL teacher -> target cache,
//! a tiny SDXL-shaped judge UNet (random weights, the teacher's conditioning widths), the
//! training run following the teacher's trajectories: learning, exact resume in the middle
//! of a trajectory, the collapse measure, the judge's checks.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::*;
use qwenclip::data::{build_cache, CacheOptions, CaptionSet, TargetCache};
use qwenclip::dev::tiny::unet::{tiny_judge_shape, unet_shape, write_unet, UNetFileLayout};
use qwenclip::sampling::PredictionType;
use qwenclip::teacher::Teacher;
use qwenclip::training::run::{self, Event, Need, Resume, Run, RunSpec, RunSummary};
use qwenclip::training::vision::{Judge, Judging};
use qwenclip::unet::UNetConfig;
use qwenclip::{Encoder, EncoderOptions, LoraMode};

fn teacher_dir() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let d = scratch(&format!("vision-teacher-{}", std::process::id()));
        qwenclip::dev::tiny::write_tiny_teacher(&d, 0).unwrap();
        d
    })
    .clone()
}

/// The tiny UNet made to take the tiny teacher's conditioning: 64 wide, pooled 16.
fn judge_config() -> UNetConfig {
    tiny_judge_shape()
}

fn judge_dir(layout: UNetFileLayout) -> PathBuf {
    let cfg = judge_config();
    let name = match layout {
        UNetFileLayout::Diffusers => "vision-judge",
        UNetFileLayout::SingleFile => "vision-judge.safetensors",
    };
    let path = scratch(&format!("{name}-{}", std::process::id()));
    if layout == UNetFileLayout::SingleFile {
        let _ = std::fs::remove_dir_all(&path);
    }
    write_unet(&cfg, &path, layout, DType::F32, 7).unwrap();
    path
}

fn judge() -> Judge {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| judge_dir(UNetFileLayout::Diffusers));
    Judge::load(dir, None, None, DType::F32, &Device::Cpu).unwrap()
}

fn captions(n: usize) -> CaptionSet {
    let colors = ["red", "blue", "green", "yellow", "black", "white"];
    let objects = ["cat", "dog", "car", "house", "tree", "bird", "cup"];
    let relations = ["left of", "right of", "under", "above"];
    let mut out = Vec::new();
    'all: for c in colors {
        for o in objects {
            for r in relations {
                out.push(format!(
                    "a {c} {o} {r} a {} {}",
                    colors[(out.len() + 1) % 6],
                    objects[out.len() % 7]
                ));
                if out.len() == n {
                    break 'all;
                }
            }
        }
    }
    CaptionSet::from_captions(out, "generated").unwrap()
}

fn cache(name: &str, n: usize) -> TargetCache {
    let teacher = Teacher::load(&teacher_dir(), &Device::Cpu).unwrap();
    let dir = scratch(name);
    build_cache(
        &teacher,
        &captions(n),
        &dir,
        &CacheOptions {
            shard_size: 64,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap()
}

fn student() -> Encoder {
    let opts = EncoderOptions {
        lora_mode: LoraMode::Unmerged,
        ..Default::default()
    };
    Encoder::load(&tiny().join("model"), None, opts).unwrap()
}

fn config(steps: u64) -> serde_json::Value {
    serde_json::json!({
        "objective": "vision", "steps": steps, "batch_size": 4, "held_out": 0.25,
        "eval_every": 0, "save_every": 0, "eval_batch_size": 16, "lr_lora": 3e-3,
        "lr_resampler": 5e-3, "lora_r": 4, "lora_alpha": 4.0, "resampler_width": 64,
        "resampler_heads": 4, "resampler_ff_mult": 2, "resampler_layers": 2,
        "schedule": "constant",
        "vision": {"resolution": 32, "denoise_steps": 4},
    })
}

/// The empty prompt's teacher targets, as the CLI computes them.
fn empty_prompt() -> (Tensor, Tensor) {
    let t = Teacher::load(&teacher_dir(), &Device::Cpu).unwrap();
    let out = t.encode(&[""]).unwrap();
    (out.prompt_embeds, out.pooled)
}

fn train(
    cache: &TargetCache,
    settings: serde_json::Value,
    out: &Path,
    resume: bool,
    stop_at: Option<u64>,
) -> qwenclip::Result<RunSummary> {
    let d = cache.dims();
    let mut run = Run::open(
        student(),
        cache.captions().to_vec(),
        RunSpec {
            out: out.to_path_buf(),
            settings,
            dims: d,
            resume: if resume {
                Resume::From(out.to_path_buf())
            } else {
                Resume::Never
            },
            judge: Judging::Unet(Box::new(judge())),
        },
    )?;
    let stop = AtomicBool::new(false);
    let empty = empty_prompt();
    run::drive(
        &mut run,
        &mut |req| match req.need {
            Need::Empty => Ok(empty.clone()),
            _ => cache.get_batch(&req.indices, &Device::Cpu),
        },
        &stop,
        &mut |ev| {
            if let Event::Step { report, .. } = ev {
                if Some(report.step) == stop_at {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        },
    )
}

#[test]
fn the_student_learns_from_the_judge_and_the_held_out_vision_loss_falls() {
    let cache = cache("vision-learn", 48);
    let out = scratch("vision-learn-run");
    let _ = std::fs::remove_dir_all(&out);
    let s = train(&cache, config(200), &out, false, None).unwrap();
    let first = s.first_eval.vision_loss.unwrap();
    let last = s.final_eval.vision_loss.unwrap();
    eprintln!("held-out vision loss {first} -> {last}; {:?}", s.final_eval);
    assert!(
        last <= 0.5 * first,
        "vision loss fell less than 50%: {first} -> {last}"
    );
    let metrics = std::fs::read_to_string(out.join(run::METRICS_FILE)).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss_vision").is_some())
        .collect();
    assert_eq!(
        steps.len(),
        200,
        "one line per optimizer step, with the vision loss"
    );
    let pair = (
        s.final_eval.pairwise_cos_student.unwrap(),
        s.final_eval.pairwise_cos_teacher.unwrap(),
    );
    assert!(
        pair.0.is_finite() && pair.1 > 0.0 && pair.1 < 1.0,
        "{pair:?}"
    );
}

#[test]
fn a_vision_run_stopped_mid_trajectory_resumes_exactly() {
    let cache = cache("vision-resume", 24);
    let straight = scratch("vision-resume-straight");
    let split = scratch("vision-resume-split");
    for d in [&straight, &split] {
        let _ = std::fs::remove_dir_all(d);
    }
    // 4 denoising steps per trajectory: a stop after step 6 is in the middle of the second.
    let cfg = {
        let mut c = config(10);
        c["grad_accum"] = 1.into();
        c
    };
    train(&cache, cfg.clone(), &straight, false, None).unwrap();
    let first = train(&cache, cfg.clone(), &split, false, Some(6)).unwrap();
    assert!(first.interrupted && first.steps == 6, "{first:?}");
    let ckpt = qwenclip::training::trainer::read_state(&split.join(run::CHECKPOINT_FILE)).unwrap();
    assert_eq!(
        ckpt.extra["trajectory"]["step"], 2,
        "the checkpoint holds the trajectory in progress"
    );
    let s = train(&cache, cfg, &split, true, None).unwrap();
    assert_eq!(s.steps, 10);
    for f in ["adapter_model.safetensors", "resampler.safetensors"] {
        let a = load(&straight.join("adapter").join(f));
        let b = load(&split.join("adapter").join(f));
        for (name, t) in &a {
            assert_eq!(
                max_diff(t, &b[name]),
                0.0,
                "{f}:{name} differs after the resume"
            );
        }
    }
}

/// A host that judges the student with its own UNet (here the library's, driven from outside
/// the run as the ComfyUI node drives ComfyUI's): it walks the run's trajectory from the
/// run's noise, computes the vision loss and its gradient with respect to the conditioning
/// the run hands out, and gives them back. With `Judging::Unet` the same loop only supplies
/// targets (the library judges). Returns each optimizer step's loss and the gradient
/// accumulated by the first training micro-batch.
fn walk(
    cache: &TargetCache,
    settings: serde_json::Value,
    out: &Path,
    judging: Judging,
) -> (Vec<f64>, BTreeMap<String, Tensor>) {
    let host = matches!(judging, Judging::Host);
    let d = cache.dims();
    let mut run = Run::open(
        student(),
        cache.captions().to_vec(),
        RunSpec {
            out: out.to_path_buf(),
            settings,
            dims: d,
            resume: Resume::Never,
            judge: judging,
        },
    )
    .unwrap();
    let judge = judge();
    let empty = empty_prompt();
    let mut losses = Vec::new();
    let mut first_gradient = None;
    while let Some(req) = run.request().cloned() {
        if req.need == Need::Empty {
            assert!(!host, "a host that judges has its own empty prompt");
            run.supply(&empty.0, &empty.1).unwrap();
            continue;
        }
        let (te, tp) = cache.get_batch(&req.indices, &Device::Cpu).unwrap();
        let events = if req.need != Need::Train || !host {
            run.supply(&te, &tp).unwrap()
        } else {
            let t = run.request_trajectory().unwrap().clone();
            let sampler = judge.sampler(t.sampler, t.denoise_steps).unwrap();
            let n = t.indices.len();
            let time_ids = judge.time_ids(n, t.resolution).unwrap();
            let noise = run.trajectory_noise(4).unwrap();
            let mut x = (noise * sampler.init_noise_sigma()).unwrap();
            let uncond = (&empty.0, &empty.1);
            for k in 0..t.step {
                x = judge
                    .teacher_step(
                        sampler.as_ref(),
                        k,
                        &x,
                        &time_ids,
                        (&te, &tp),
                        uncond,
                        &t.guidance,
                    )
                    .unwrap()
                    .1;
            }
            let (want, _) = judge
                .teacher_step(
                    sampler.as_ref(),
                    t.step,
                    &x,
                    &time_ids,
                    (&te, &tp),
                    uncond,
                    &t.guidance,
                )
                .unwrap();
            let (se, sp) = run.student_conditioning().unwrap();
            let (ve, vp) = (
                candle_core::Var::from_tensor(&se).unwrap(),
                candle_core::Var::from_tensor(&sp).unwrap(),
            );
            let got = judge
                .predict(
                    sampler.as_ref(),
                    t.step,
                    &x,
                    &time_ids,
                    (ve.as_tensor(), vp.as_tensor()),
                    qwenclip::ForwardMode::Differentiable,
                )
                .unwrap();
            let loss = qwenclip::training::vision::vision_loss(&got, &want).unwrap();
            let grads = loss.backward().unwrap();
            let value = loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let (ge, gp) = (grads.get(&ve).unwrap(), grads.get(&vp).unwrap());
            run.supply_gradient((&te, &tp), (ge, gp), value).unwrap()
        };
        if req.need == Need::Train && first_gradient.is_none() {
            first_gradient = Some(run.trainer().accumulated_gradient().clone());
        }
        for e in events {
            if let Event::Step { report, .. } = e {
                losses.push(report.loss);
            }
        }
    }
    (losses, first_gradient.expect("a training micro-batch"))
}

#[test]
fn a_host_that_judges_through_the_gradient_it_returns_trains_as_the_library_judge_does() {
    let cache = cache("vision-host", 16);
    let (lib, host) = (scratch("vision-host-lib"), scratch("vision-host-host"));
    for d in [&lib, &host] {
        let _ = std::fs::remove_dir_all(d);
    }
    // Two trajectories of 4 denoising steps (the host replays the second from its noise),
    // accumulation over two micro-batches, mixed objective (the output term too).
    let mut cfg = config(3);
    cfg["objective"] = "mixed".into();
    cfg["grad_accum"] = 2.into();
    cfg["eval_every"] = 2.into();
    let (want, want_grad) = walk(&cache, cfg.clone(), &lib, Judging::Unet(Box::new(judge())));
    let (got, got_grad) = walk(&cache, cfg, &host, Judging::Host);
    assert_eq!((want.len(), got.len()), (3, 3));
    // The same losses step after step (Adam's steps carry rounding on; 1e-4 holds).
    for (a, b) in want.iter().zip(&got) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "step losses differ: {want:?} vs {got:?}"
        );
    }
    // The first micro-batch's gradient for every LoRA and resampler tensor.
    assert_eq!(want_grad.len(), got_grad.len());
    let mut nonzero = 0;
    for (name, w) in &want_grad {
        let scale = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        nonzero += usize::from(scale > 0.0);
        let diff = max_diff(w, &got_grad[name]);
        assert!(
            diff <= 1e-4 * scale,
            "{name}: the injected gradient and the library's differ by {diff} (scale {scale})"
        );
    }
    // LoRA A starts with zero gradient (B = 0); everything else moves.
    assert!(
        nonzero * 2 > want_grad.len(),
        "{nonzero} of {} gradients are nonzero",
        want_grad.len()
    );
}

#[test]
fn the_judge_checks_what_it_is_given() {
    // Conditioning widths that are not the targets'.
    let cache = cache("vision-bad", 8);
    let mut narrow = unet_shape("tiny").unwrap();
    narrow.projection_class_embeddings_input_dim = Some(20 + 6 * 8);
    let dir = scratch("vision-judge-narrow");
    write_unet(&narrow, &dir, UNetFileLayout::Diffusers, DType::F32, 1).unwrap();
    let d = cache.dims();
    let spec = |judge| RunSpec {
        out: scratch("vision-bad-run"),
        settings: config(1),
        dims: d,
        resume: Resume::Never,
        judge,
    };
    let narrow = Judge::load(&dir, None, None, DType::F32, &Device::Cpu).unwrap();
    let err = Run::open(
        student(),
        cache.captions().to_vec(),
        spec(Judging::Unet(Box::new(narrow))),
    )
    .err()
    .expect("a judge of other widths is refused")
    .to_string();
    assert!(err.contains("24 wide") && err.contains("64"), "{err}");
    // No judge for the vision objective.
    let err = Run::open(student(), cache.captions().to_vec(), spec(Judging::None))
        .err()
        .expect("the vision objective needs a judge")
        .to_string();
    assert!(err.contains("--unet"), "{err}");
    // A single file that says it is v-prediction is not judged as epsilon.
    let file = judge_dir(UNetFileLayout::SingleFile);
    let mut tensors = load(&file);
    tensors.insert(
        "v_pred".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let cfg = judge_config();
    let err = Judge::load(
        &file,
        Some(&cfg),
        Some(PredictionType::Epsilon),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("v_pred") && err.contains("v-prediction"),
        "{err}"
    );
    let j = Judge::load(&file, Some(&cfg), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(j.scheduler.prediction_type.as_deref(), Some("v_prediction"));
}

/// Captions made to collapse: they differ in one word (subject, colour or position).
fn one_word_apart() -> CaptionSet {
    let mut out = Vec::new();
    for subject in ["cube", "sphere", "cat", "car"] {
        for colour in ["red", "blue", "green"] {
            for place in ["on the left", "on the right", "at the top"] {
                out.push(format!("a {colour} {subject} {place}"));
            }
        }
    }
    CaptionSet::from_captions(out, "one word apart").unwrap()
}

#[test]
fn collapse_after_output_matching_vision_and_mixed_training_over_three_seeds() {
    let teacher = Teacher::load(&teacher_dir(), &Device::Cpu).unwrap();
    let dir = scratch("vision-collapse-cache");
    let cache = build_cache(
        &teacher,
        &one_word_apart(),
        &dir,
        &CacheOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let mut table = Vec::new();
    for seed in 0..3u64 {
        for objective in ["mse", "vision", "mixed"] {
            let out = scratch(&format!("vision-collapse-{objective}-{seed}"));
            let _ = std::fs::remove_dir_all(&out);
            let mut cfg = config(80);
            cfg["objective"] = objective.into();
            cfg["seed"] = seed.into();
            let s = train(&cache, cfg, &out, false, None).unwrap();
            let m = &s.final_eval;
            let ratio = m.pairwise_cos_student.unwrap() / m.pairwise_cos_teacher.unwrap();
            table.push((seed, objective, ratio, m.vision_loss.unwrap(), m.mse_embeds));
        }
    }
    eprintln!("seed objective  student/teacher pairwise cosine  held-out vision loss  mse embeds");
    for (seed, o, r, v, e) in &table {
        eprintln!("{seed}    {o:<8}  {r:.4}  {v:.5}  {e:.4}");
    }
    // What held for all three seeds on these tiny random models (a random judge barely
    // tells prompts apart, unlike SDXL's): every student puts the prompts closer together
    // than the teacher does, and adding output matching to the vision loss keeps the
    // conditioning nearer the teacher's than the vision loss alone.
    for seed in 0..3u64 {
        let row = |o: &str| *table.iter().find(|t| t.0 == seed && t.1 == o).unwrap();
        for o in ["mse", "vision", "mixed"] {
            let (_, _, r, v, e) = row(o);
            assert!(r.is_finite() && v.is_finite() && e.is_finite());
            assert!(r > 1.0, "seed {seed} {o}: ratio {r}");
        }
        assert!(row("mixed").4 < row("vision").4, "seed {seed}");
    }
}

#[test]
fn a_host_judge_under_output_matching_takes_targets_and_refuses_a_gradient() {
    // A run opened with a host judge whose objective is mse (a resumed run may switch
    // objectives): training batches take targets as usual, and a gradient is refused.
    let cache = cache("vision-host-mse", 8);
    let out = scratch("vision-host-mse-run");
    let _ = std::fs::remove_dir_all(&out);
    let mut cfg = config(2);
    cfg["objective"] = "mse".into();
    let mut run = Run::open(
        student(),
        cache.captions().to_vec(),
        RunSpec {
            out,
            settings: cfg,
            dims: cache.dims(),
            resume: Resume::Never,
            judge: Judging::Host,
        },
    )
    .unwrap();
    while let Some(req) = run.request().cloned() {
        let (te, tp) = cache.get_batch(&req.indices, &Device::Cpu).unwrap();
        if req.need == Need::Train {
            assert!(run.request_trajectory().is_none());
            let err = run
                .supply_gradient((&te, &tp), (&te, &tp), 1.0)
                .unwrap_err();
            assert!(
                err.to_string().contains("supply the targets alone"),
                "{err}"
            );
            assert!(run.student_conditioning().is_err());
        }
        run.supply(&te, &tp).unwrap();
    }
    assert_eq!(run.step(), 2);
}
