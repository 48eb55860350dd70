//! Distillation end to end on tiny models: tiny SDXL teacher -> target cache -> training run
//! -> adapter; learning, exact resume of a run, NaN stop, a failed checkpoint write.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use common::*;
use qwenclip::data::{build_cache, CacheOptions, CaptionSet, TargetCache, TargetSource};
use qwenclip::teacher::Teacher;
use qwenclip::training::run::{self, Event, Resume, Run, RunSpec, RunSummary};
use qwenclip::training::vision::Judging;
use qwenclip::training::{Schedule, TrainConfig};
use qwenclip::{Encoder, EncoderOptions, Error, LoraMode};

/// 400 distinct spatial captions from a seeded template.
fn captions() -> CaptionSet {
    let colors = [
        "red", "blue", "green", "yellow", "black", "white", "purple", "orange",
    ];
    let objects = [
        "cat", "dog", "car", "house", "tree", "bird", "cup", "chair", "horse", "boat",
    ];
    let relations = ["left of", "right of", "under", "above", "next to", "behind"];
    let mut rng = qwenclip::rng::Rng::new(0);
    let mut set = std::collections::BTreeSet::new();
    while set.len() < 400 {
        let mut pick = |xs: &[&'static str]| xs[rng.below(xs.len())];
        set.insert(format!(
            "a {} {} {} a {} {}",
            pick(&colors),
            pick(&objects),
            pick(&relations),
            pick(&colors),
            pick(&objects)
        ));
    }
    CaptionSet::from_captions(set, "generated").unwrap()
}

fn teacher_dir() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let d = scratch(&format!("teacher-{}", std::process::id()));
        qwenclip::dev::tiny::write_tiny_teacher(&d, 0).unwrap();
        d
    })
    .clone()
}

fn cache(name: &str, source: &dyn TargetSource, captions: &CaptionSet) -> TargetCache {
    let dir = scratch(name);
    build_cache(
        source,
        captions,
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

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        lr_lora: 3e-3,
        lr_resampler: 5e-3,
        steps,
        batch_size: 8,
        held_out: 0.1,
        eval_every: 0,
        save_every: 0,
        eval_batch_size: 40,
        lora_r: 4,
        lora_alpha: 4.0,
        resampler_width: 64,
        resampler_heads: 4,
        resampler_ff_mult: 2,
        resampler_layers: 2,
        ..Default::default()
    }
}

/// Trains on `cache` into `out` (resuming the run in `resume`); with `stop_at`, stops there as
/// Ctrl-C would (a checkpoint is saved and the run is marked interrupted).
fn train_until(
    cache: &TargetCache,
    cfg: TrainConfig,
    out: &Path,
    resume: Option<&Path>,
    stop_at: Option<u64>,
) -> qwenclip::Result<RunSummary> {
    let d = cache.dims();
    let mut run = Run::open(
        student(),
        cache.captions().to_vec(),
        RunSpec {
            out: out.to_path_buf(),
            settings: serde_json::to_value(cfg).unwrap(),
            dims: d,
            resume: match resume {
                Some(dir) => Resume::From(dir.to_path_buf()),
                None => Resume::Never,
            },
            judge: Judging::None,
        },
    )?;
    let stop = AtomicBool::new(false);
    let device = candle_core::Device::Cpu;
    run::drive(
        &mut run,
        &mut |req| cache.get_batch(&req.indices, &device),
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

fn train(
    cache: &TargetCache,
    cfg: TrainConfig,
    out: &Path,
    resume: Option<&Path>,
) -> qwenclip::Result<RunSummary> {
    train_until(cache, cfg, out, resume, None)
}

#[test]
fn the_student_learns_the_teacher_and_beats_the_mean_on_held_out_captions() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let cache = cache("distill-learn", &teacher, &captions());
    let out = scratch("distill-learn-run");
    let s = train(&cache, config(200), &out, None).unwrap();
    let total = |m: &qwenclip::training::EvalMetrics| m.mse_embeds + m.mse_pooled;
    eprintln!(
        "baseline {:?}\nfirst {:?}\nfinal {:?}",
        s.baseline_mean, s.first_eval, s.final_eval
    );
    assert!(
        total(&s.final_eval) <= 0.5 * total(&s.first_eval),
        "held-out MSE fell less than 50%"
    );
    assert!(
        total(&s.final_eval) < total(&s.baseline_mean),
        "the student does not beat predicting the mean"
    );
    assert!(s.final_eval.mse_pooled < s.baseline_mean.mse_pooled);
    assert!(s.final_eval.cos_pooled > s.baseline_mean.cos_pooled);
    // Everything a user is promised is there, and the adapter encodes to the teacher's dims.
    for f in [
        run::CHECKPOINT_FILE,
        run::METRICS_FILE,
        run::LOSS_PNG,
        "adapter/qwenclip.json",
        "adapter/adapter_config.json",
        "adapter/resampler.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read(out.join(run::LOSS_PNG))
        .unwrap()
        .starts_with(b"\x89PNG\r\n\x1a\n"));
    let enc = Encoder::load(
        &tiny().join("model"),
        Some(&out.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap();
    let c = enc.encode(&["a red cat under a blue chair"]).unwrap();
    assert_eq!(
        (c.prompt_embeds.dims(), c.pooled.dims()),
        (&[1, 77, 64][..], &[1, 16][..])
    );
    // The run folder itself is accepted wherever an adapter is.
    let from_run = Encoder::load(&tiny().join("model"), Some(&out), EncoderOptions::default())
        .unwrap()
        .encode(&["a red cat under a blue chair"])
        .unwrap();
    assert_eq!(max_diff(&from_run.prompt_embeds, &c.prompt_embeds), 0.0);
    let metrics = std::fs::read_to_string(out.join(run::METRICS_FILE)).unwrap();
    let steps = metrics
        .lines()
        .filter(|l| l.contains("\"grad_norm\""))
        .count();
    assert_eq!(steps, 200, "one metrics line per optimizer step");
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for f in ["adapter_model.safetensors", "resampler.safetensors"] {
        let mut t: Vec<_> = load(&dir.join(f)).into_iter().collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(t);
    }
    out
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let captions =
        CaptionSet::from_captions(captions().captions.into_iter().take(40), "first 40").unwrap();
    let cache = cache("distill-resume", &teacher, &captions);
    let cfg = TrainConfig {
        grad_accum: 2,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        ..config(8)
    };
    let straight = scratch("distill-resume-straight");
    let cfg = TrainConfig {
        save_every: 4,
        ..cfg
    };
    train(&cache, cfg.clone(), &straight, None).unwrap();
    let split = scratch("distill-resume-split");
    let first = train_until(&cache, cfg.clone(), &split, None, Some(4)).unwrap();
    assert!(first.interrupted && first.steps == 4, "{first:?}");
    let s = train(&cache, cfg, &split, Some(&split)).unwrap();
    assert_eq!(s.steps, 8);
    for ((n, a), (_, b)) in adapter_tensors(&straight.join("adapter"))
        .iter()
        .zip(adapter_tensors(&split.join("adapter")).iter())
    {
        let d = max_diff(a, b);
        assert!(d <= 1e-6, "{n}: resumed differs by {d:e}");
    }
    let lines = |d: &Path| {
        std::fs::read_to_string(d.join(run::METRICS_FILE))
            .unwrap()
            .lines()
            .filter(|l| l.contains("grad_norm"))
            .count()
    };
    assert_eq!(
        lines(&split),
        lines(&straight),
        "metrics are not duplicated by the resume"
    );
}

/// The tiny teacher, except that one caption's targets are NaN.
struct Poisoned(Teacher);

impl TargetSource for Poisoned {
    fn fingerprint(&self) -> String {
        format!("poisoned-{}", TargetSource::fingerprint(&self.0))
    }
    fn describe(&self) -> String {
        "poisoned tiny teacher".into()
    }
    fn encode(&self, captions: &[&str]) -> qwenclip::Result<(Tensor, Tensor, Vec<usize>)> {
        let (e, p, d) = TargetSource::encode(&self.0, captions)?;
        let rows: Vec<Tensor> = captions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let r = e.narrow(0, i, 1).unwrap();
                if c.contains("poison") {
                    (r * f64::NAN).unwrap()
                } else {
                    r
                }
            })
            .collect();
        Ok((Tensor::cat(&rows, 0)?, p, d))
    }
}

#[test]
fn nan_targets_stop_the_run_and_keep_the_last_good_checkpoint() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let mut texts: Vec<String> = captions().captions.into_iter().take(30).collect();
    texts.push("a poison apple".into());
    let set = CaptionSet::from_captions(texts, "poisoned").unwrap();
    let cache = cache("distill-nan", &Poisoned(teacher), &set);
    let out = scratch("distill-nan-run");
    let err = train(
        &cache,
        TrainConfig {
            save_every: 1,
            held_out: 0.0,
            ..config(100)
        },
        &out,
        None,
    )
    .expect_err("NaN must stop the run");
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("NaN") && msg.contains("checkpoint.safetensors"),
        "{msg}"
    );
    let ckpt = out.join(run::CHECKPOINT_FILE);
    let state = qwenclip::training::trainer::read_state(&ckpt).unwrap();
    assert!(state.t >= 1, "a good checkpoint was kept");
    let (t, _) = qwenclip::training::Trainer::resume(student(), &ckpt).unwrap();
    let adapter = t.adapter().unwrap();
    for p in adapter.resampler.unwrap().params().values() {
        assert!(
            p.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite()),
            "the kept checkpoint is finite"
        );
    }
    assert!(std::fs::read_to_string(out.join(run::METRICS_FILE))
        .unwrap()
        .contains("\"error\""));
}

#[test]
fn a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let set = CaptionSet::from_captions(captions().captions.into_iter().take(20), "20").unwrap();
    let cache = cache("distill-full", &teacher, &set);
    let out = scratch("distill-full-run");
    let cfg = TrainConfig {
        save_every: 2,
        ..config(4)
    };
    train_until(&cache, cfg.clone(), &out, None, Some(2)).unwrap();
    let ckpt = out.join(run::CHECKPOINT_FILE);
    let before = std::fs::read(&ckpt).unwrap();
    // The next checkpoint's temporary file is a link to /dev/full: every write fails with ENOSPC.
    let tmp = out.join(format!(
        ".{}.tmp{}",
        run::CHECKPOINT_FILE,
        std::process::id()
    ));
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let err = train(&cache, cfg.clone(), &out, Some(&out)).expect_err("the write must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("checkpoint.safetensors") && msg.to_lowercase().contains("no space left"),
        "{msg}"
    );
    assert!(
        std::fs::read(&ckpt).unwrap() == before,
        "the previous checkpoint changed"
    );
    assert!(!tmp.exists(), "the temporary file is cleaned up");
    // With space again, the run resumes from that checkpoint and finishes.
    let s = train(&cache, cfg, &out, Some(&out)).unwrap();
    assert_eq!(s.steps, 4);
}

#[test]
fn a_cache_from_another_teacher_is_refused_with_the_reason() {
    let set = CaptionSet::from_captions(captions().captions.into_iter().take(10), "10").unwrap();
    let t0 = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let other = scratch("distill-other-teacher");
    qwenclip::dev::tiny::write_tiny_teacher(&other, 1).unwrap();
    let t1 = Teacher::load(&other, &candle_core::Device::Cpu).unwrap();
    let dir = scratch("distill-mismatch");
    build_cache(&t0, &set, &dir, &CacheOptions::default(), &mut |_| {}).unwrap();
    let err = build_cache(&t1, &set, &dir, &CacheOptions::default(), &mut |_| {})
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.contains("teacher") && err.contains("--overwrite"),
        "{err}"
    );
    let c = TargetCache::open(&dir).unwrap();
    let err = c
        .check_against(Some(&t1.fingerprint()), None)
        .expect_err("must refuse")
        .to_string();
    assert!(err.contains("teacher"), "{err}");
}

#[test]
fn a_larger_steps_extends_a_finished_run_and_replans_its_schedule() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let set = CaptionSet::from_captions(captions().captions.into_iter().take(24), "24").unwrap();
    let cache = cache("distill-extend", &teacher, &set);
    let out = scratch("distill-extend-run");
    let cfg = TrainConfig {
        schedule: Schedule::Cosine,
        ..config(4)
    };
    assert_eq!(train(&cache, cfg.clone(), &out, None).unwrap().steps, 4);
    // Asking for fewer steps than done: nothing to train, and the run says so.
    let d = cache.dims();
    let open = |settings: serde_json::Value| {
        Run::open(
            student(),
            cache.captions().to_vec(),
            RunSpec {
                out: out.clone(),
                settings,
                dims: d,
                resume: Resume::From(out.clone()),
                judge: Judging::None,
            },
        )
        .unwrap()
    };
    let fewer = open(serde_json::json!({"steps": 3}));
    assert!(fewer.is_done());
    assert!(
        fewer.notes().iter().any(|n| n.contains("nothing to train")),
        "{:?}",
        fewer.notes()
    );
    drop(fewer);
    let more = open(serde_json::json!({"steps": 8, "seed": 99}));
    assert!(!more.is_done());
    let notes = more.notes().join("\n");
    assert!(notes.contains("re-planned over 8 steps"), "{notes}");
    assert!(notes.contains("kept seed = 0"), "{notes}");
    drop(more);
    let s = train(
        &cache,
        TrainConfig {
            steps: 8,
            ..cfg.clone()
        },
        &out,
        Some(&out),
    )
    .unwrap();
    assert_eq!(s.steps, 8);
    // Step 5's learning rate is the cosine over 8 steps at 4 steps done: half the peak (with
    // the first run's plan of 4 steps it would be 0).
    let metrics = std::fs::read_to_string(out.join(run::METRICS_FILE)).unwrap();
    let lr5 = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["step"] == 5 && v.get("lr_lora").is_some())
        .unwrap()["lr_lora"]
        .as_f64()
        .unwrap();
    assert!(
        (lr5 - 0.5 * cfg.lr_lora).abs() < 1e-12,
        "lr at step 5: {lr5}"
    );
}

#[test]
fn defaults_size_the_resampler_for_the_base_and_saves_write_what_was_announced() {
    let teacher = Teacher::load(&teacher_dir(), &candle_core::Device::Cpu).unwrap();
    let set = CaptionSet::from_captions(captions().captions.into_iter().take(8), "8").unwrap();
    let cache = cache("distill-sizes", &teacher, &set);
    let out = scratch("distill-sizes-run");
    let d = cache.dims();
    let mut run = Run::open(
        student(),
        cache.captions().to_vec(),
        RunSpec {
            out: out.clone(),
            settings: serde_json::json!({"steps": 1, "batch_size": 2}),
            dims: d,
            resume: Resume::Never,
            judge: Judging::None,
        },
    )
    .unwrap();
    let sizes = run.trainer().save_sizes();
    // The tiny base is 32 wide: the derived resampler is 64 wide, a few MB, not the 2048-wide
    // (208M values) a real base gets.
    assert!(sizes.adapter_bytes < 8 << 20, "{sizes:?}");
    run::drive(
        &mut run,
        &mut |req| cache.get_batch(&req.indices, &candle_core::Device::Cpu),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let written = |p: &Path| std::fs::metadata(p).unwrap().len();
    let adapter = written(&out.join("adapter/adapter_model.safetensors"))
        + written(&out.join("adapter/resampler.safetensors"));
    let ckpt = written(&out.join(run::CHECKPOINT_FILE));
    for (what, got, said) in [
        ("adapter", adapter, sizes.adapter_bytes),
        ("checkpoint", ckpt, sizes.checkpoint_bytes),
    ] {
        assert!(
            got >= said && got - said < 64 << 10,
            "{what}: wrote {got}, announced {said}"
        );
    }
    let r = qwenclip::resampler::Resampler::load(
        &out.join("adapter/resampler.safetensors"),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!((r.config().width, r.config().heads), (64, 1));
}
