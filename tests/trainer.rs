//! The one-step trainer API: learning, gradient accumulation, exact resume, NaN handling.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use qwenclip::resampler::ResamplerConfig;
use qwenclip::training::{TargetDims, TrainConfig, Trainer};
use qwenclip::{Encoder, EncoderOptions, Error, ForwardMode};

const DIMS: TargetDims = TargetDims {
    seq: 77,
    embed: 24,
    pooled: 8,
};

const CAPTIONS: [&str; 8] = [
    "a red cube left of a blue sphere",
    "a cat sleeping under a wooden table",
    "two dogs running on a beach at sunset",
    "a bowl of fruit, no bananas",
    "portrait of an old man with a white beard",
    "a castle on a hill above a misty valley",
    "",
    "a green bicycle leaning against a brick wall",
];

fn encoder() -> Encoder {
    Encoder::load(&tiny().join("model"), None, EncoderOptions::default()).unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        lr_lora: 1e-3,
        lr_resampler: 3e-3,
        lora_r: 4,
        lora_alpha: 8.0,
        resampler_width: 32,
        resampler_heads: 4,
        resampler_ff_mult: 2,
        resampler_layers: 2,
        steps: 40,
        max_grad_norm: 0.0,
        ..Default::default()
    }
}

/// Targets from a fixed random "teacher": a second student with other weights.
fn targets(prompts: &[&str]) -> (Tensor, Tensor) {
    let d = tiny();
    let cfg = qwenclip::llm::Qwen3Config::load(&d.join("model/config.json")).unwrap();
    let rc = ResamplerConfig {
        width: 16,
        heads: 2,
        ff_mult: 2,
        layers: 1,
        num_latents: DIMS.seq,
        output_dim: DIMS.embed,
        pooled_dim: DIMS.pooled,
        ..ResamplerConfig::for_input(32)
    };
    let adapter = qwenclip::dev::tiny::make_adapter(&cfg, "qwenclip-tiny", rc, 1234).unwrap();
    let mut enc = encoder();
    enc.install(adapter).unwrap();
    let c = enc.encode(prompts).unwrap();
    (c.prompt_embeds, c.pooled)
}

fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
    let a = t.adapter().unwrap();
    let mut out: Vec<(String, Tensor)> = a
        .resampler
        .unwrap()
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (site, p) in a.lora.unwrap().pairs {
        out.push((format!("{}.A", site.peft_prefix()), p.a));
        out.push((format!("{}.B", site.peft_prefix()), p.b));
    }
    out
}

fn assert_same_weights(a: &Trainer, b: &Trainer, tol: f32) {
    for ((n, x), (_, y)) in weights(a).iter().zip(weights(b).iter()) {
        let d = max_diff(x, y);
        assert!(d <= tol, "{n}: {d:e} > {tol:e}");
    }
}

#[test]
fn loss_falls_when_fitting_a_fixed_teacher() {
    let (te, tp) = targets(&CAPTIONS);
    let mut t = Trainer::new(encoder(), config(), DIMS).unwrap();
    let first = t.step(&CAPTIONS, &te, &tp).unwrap();
    let mut last = first.clone();
    for _ in 0..30 {
        last = t.step(&CAPTIONS, &te, &tp).unwrap();
    }
    assert!(last.optimizer_stepped && last.step == 31);
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
}

#[test]
fn gradient_accumulation_equals_the_big_batch() {
    let p = &CAPTIONS[..4];
    let (te, tp) = targets(p);
    let mut big = Trainer::new(encoder(), config(), DIMS).unwrap();
    let mut acc = Trainer::new(
        encoder(),
        TrainConfig {
            grad_accum: 2,
            ..config()
        },
        DIMS,
    )
    .unwrap();
    for _ in 0..3 {
        let r = big.step(p, &te, &tp).unwrap();
        assert!(r.optimizer_stepped);
        let r1 = acc
            .step(
                &p[..2],
                &te.narrow(0, 0, 2).unwrap(),
                &tp.narrow(0, 0, 2).unwrap(),
            )
            .unwrap();
        assert!(!r1.optimizer_stepped && r1.grad_norm.is_none());
        let r2 = acc
            .step(
                &p[2..],
                &te.narrow(0, 2, 2).unwrap(),
                &tp.narrow(0, 2, 2).unwrap(),
            )
            .unwrap();
        assert!(r2.optimizer_stepped);
        let (g1, g2) = (r.grad_norm.unwrap(), r2.grad_norm.unwrap());
        assert!((g1 - g2).abs() <= 1e-4 * g1, "grad norms {g1} vs {g2}");
    }
    // Micro-batches are padded to their own length, the big batch to the longest prompt: the
    // gradients agree to float rounding, which AdamW's 1/sqrt(v) amplifies for entries near
    // zero (a few % of one lr-sized update at most).
    assert_same_weights(&big, &acc, 1e-4);
}

/// A held-out metric a run stored in its checkpoint; serde_json's default (fast) float
/// parser reads it back one ulp off.
const NOT_ROUND_TRIPPED_BY_DEFAULT: f64 = 0.9632449591050427;

#[test]
fn resume_from_a_checkpoint_continues_exactly() {
    let (te, tp) = targets(&CAPTIONS);
    let cfg = TrainConfig {
        grad_accum: 2,
        warmup_steps: 2,
        ..config()
    };
    let half = |t: &mut Trainer| {
        for i in 0..3 {
            let b = i % 2 * 4;
            t.step(
                &CAPTIONS[b..b + 4],
                &te.narrow(0, b, 4).unwrap(),
                &tp.narrow(0, b, 4).unwrap(),
            )
            .unwrap();
        }
    };
    let mut straight = Trainer::new(encoder(), cfg.clone(), DIMS).unwrap();
    half(&mut straight);
    half(&mut straight);

    let dir = scratch("trainer-resume");
    let mut first = Trainer::new(encoder(), cfg, DIMS).unwrap();
    half(&mut first);
    assert_eq!(
        first.pending_micro_batches(),
        1,
        "the checkpoint is taken mid-accumulation"
    );
    first
        .save(
            &dir.join("ckpt.safetensors"),
            serde_json::json!({"note": "mine", "cos": NOT_ROUND_TRIPPED_BY_DEFAULT}),
        )
        .unwrap();
    drop(first);
    let (mut resumed, extra) = Trainer::resume(encoder(), &dir.join("ckpt.safetensors")).unwrap();
    assert_eq!(extra["note"], "mine");
    assert_eq!(
        extra["cos"].as_f64(),
        Some(NOT_ROUND_TRIPPED_BY_DEFAULT),
        "a resumed run's loop state comes back bit for bit"
    );
    half(&mut resumed);
    assert_eq!(resumed.step_count(), straight.step_count());
    assert_same_weights(&straight, &resumed, 1e-6);
}

/// Rewrites the trainer state in a checkpoint's header; the tensors stay as they are.
fn edit_state(path: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &mut header["__metadata__"]["qwenclip.trainer"];
    let mut state: serde_json::Value = serde_json::from_str(meta.as_str().unwrap()).unwrap();
    edit(&mut state);
    *meta = state.to_string().into();
    let mut text = header.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// A checkpoint's settings come from its header: a damaged one (found by fuzzing: a
/// resampler width lost from the JSON, so the 2048 default, from a 17 KB file) must not make
/// resuming build what they describe (hundreds of MB, or terabytes: an allocation failure
/// aborts the host) before the file is seen not to hold it.
#[test]
fn a_checkpoint_whose_settings_outgrow_its_file_is_refused_before_anything_is_built() {
    let dir = scratch("trainer-outgrown");
    let path = dir.join("ckpt.safetensors");
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 3] = [
        ("default width", |s| {
            s["resampler"].as_object_mut().unwrap().remove("width");
        }),
        ("rank 2^31", |s| s["lora"]["r"] = (1u64 << 31).into()),
        ("width 2^33", |s| {
            s["resampler"]["width"] = (1u64 << 33).into();
            s["resampler"]["heads"] = 1.into();
        }),
    ];
    for (what, edit) in cases {
        Trainer::new(encoder(), config(), DIMS)
            .unwrap()
            .save(&path, serde_json::json!({}))
            .unwrap();
        edit_state(&path, edit);
        let err = Trainer::resume(encoder(), &path)
            .err()
            .unwrap_or_else(|| panic!("{what}: resumed"))
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        assert!(
            err.contains("the file is damaged") || err.contains("more than any resampler has"),
            "{what}: {err}"
        );
    }
}

#[test]
fn non_finite_targets_stop_without_touching_the_weights() {
    let (te, tp) = targets(&CAPTIONS[..2]);
    let mut t = Trainer::new(encoder(), config(), DIMS).unwrap();
    t.step(&CAPTIONS[..2], &te, &tp).unwrap();
    let before = weights(&t);
    let bad = (te.clone() * f64::NAN).unwrap();
    let err = t.step(&CAPTIONS[..2], &bad, &tp).expect_err("must fail");
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("NaN"), "{err}");
    for ((n, x), (_, y)) in before.iter().zip(weights(&t).iter()) {
        assert_eq!(max_diff(x, y), 0.0, "{n} changed");
    }
    assert_eq!(t.step_count(), 1);
}

#[test]
fn wrong_target_shapes_are_refused() {
    let mut t = Trainer::new(encoder(), config(), DIMS).unwrap();
    let e = Tensor::zeros((1, 77, 2048), candle_core::DType::F32, &Device::Cpu).unwrap();
    let p = Tensor::zeros((1, 1280), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = t.step(&["x"], &e, &p).err().unwrap().to_string();
    assert!(
        err.contains("[1, 77, 24]") && err.contains("[1, 77, 2048]"),
        "{err}"
    );
}

#[test]
fn the_frozen_base_never_changes_and_the_result_loads_as_an_adapter() {
    let (te, tp) = targets(&CAPTIONS);
    let mut t = Trainer::new(encoder(), config(), DIMS).unwrap();
    for _ in 0..3 {
        t.step(&CAPTIONS, &te, &tp).unwrap();
    }
    let dir = scratch("trainer-adapter");
    t.save_adapter(&dir).unwrap();
    let trained = t.predict(&CAPTIONS, ForwardMode::Fast).unwrap();
    let enc = Encoder::load(&tiny().join("model"), Some(&dir), EncoderOptions::default()).unwrap();
    let c = enc.encode(&CAPTIONS).unwrap();
    assert_close(
        "reloaded adapter (merged) vs trainer",
        &c.prompt_embeds,
        &trained.0,
        1e-4,
    );
    let via = t.into_encoder().unwrap().encode(&CAPTIONS).unwrap();
    assert_close(
        "into_encoder vs reloaded",
        &via.prompt_embeds,
        &c.prompt_embeds,
        1e-5,
    );
    // Base weights: a fresh encoder without adapter equals the trainer's base after clear.
    let base = encoder()
        .hidden_states(&CAPTIONS, ForwardMode::Fast)
        .unwrap()
        .states;
    let mut e2 =
        Encoder::load(&tiny().join("model"), Some(&dir), EncoderOptions::default()).unwrap();
    e2.set_adapter(None).unwrap();
    assert_close(
        "base untouched",
        &e2.hidden_states(&CAPTIONS, ForwardMode::Fast)
            .unwrap()
            .states,
        &base,
        0.0,
    );
}
