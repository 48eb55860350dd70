//! Prompt weighting on the seeded tiny model: the syntax never reaches the LLM, w = 1 is the
//! plain prompt bit for bit, w = 0 is the span masked out of the resampler's attention, the
//! attention mass of weighted tokens scales by w, the conditioning moves away monotonically
//! as w grows or shrinks, batches mix weighted and plain prompts freely, and bad weights are
//! errors naming the span (library, CLI).

mod common;

use candle_core::{DType, Tensor};
use common::*;
use qwenclip::tokenizer::syntax::PromptSyntax::{self, Comfy};
use qwenclip::{Encoder, EncoderOptions, ForwardMode};

fn encoder() -> Encoder {
    let d = tiny();
    Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn embeds(enc: &Encoder, p: &str, syntax: PromptSyntax) -> Tensor {
    enc.encode_with(&[p], syntax).unwrap().prompt_embeds
}

#[test]
fn the_syntax_is_removed_and_weight_one_is_the_plain_prompt_bit_for_bit() {
    let enc = encoder();
    let plain = enc.encode(&["a red cube left of a blue sphere"]).unwrap();
    for p in [
        "a red cube left of a blue sphere",
        "a (red:1) cube left of a (blue sphere:1.0)",
        "(a red cube left of a blue sphere:1)",
    ] {
        let c = enc.encode_with(&[p], Comfy).unwrap();
        assert_eq!(bits(&c.prompt_embeds), bits(&plain.prompt_embeds), "{p}");
        assert_eq!(bits(&c.pooled), bits(&plain.pooled), "{p}");
    }
    // The weighted path itself adds exactly nothing at w = 1.
    let (h, _) = enc
        .weighted_hidden_states(&["a red cube"], PromptSyntax::None)
        .unwrap();
    let r = enc.resampler().unwrap();
    let ones = h.mask.ones_like().unwrap();
    let (a, _) = r
        .forward_weighted(&h.states, &h.mask, Some(&ones), ForwardMode::Fast)
        .unwrap();
    let (b, _) = r.forward(&h.states, &h.mask, ForwardMode::Fast).unwrap();
    assert_eq!(bits(&a), bits(&b));
    // Escaped brackets are text, and reach the LLM as such.
    let escaped = embeds(&enc, r"a \(red\) cube", Comfy);
    assert_eq!(
        bits(&escaped),
        bits(&embeds(&enc, "a (red) cube", PromptSyntax::None))
    );
}

#[test]
fn weight_zero_is_the_span_masked_out_of_the_resamplers_attention() {
    let enc = encoder();
    let r = enc.resampler().unwrap();
    let (h, w) = enc
        .weighted_hidden_states(&["a (red:0) cube left of a blue sphere"], Comfy)
        .unwrap();
    let w = w.unwrap();
    let zero = w.eq(0f64).unwrap().to_dtype(DType::F32).unwrap();
    let n_zero = zero.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(n_zero >= 1.0, "the span has tokens of weight 0");
    let masked = (&h.mask - &zero).unwrap();
    let (a, pa) = r
        .forward_weighted(&h.states, &h.mask, Some(&w), ForwardMode::Fast)
        .unwrap();
    let (b, pb) = r.forward(&h.states, &masked, ForwardMode::Fast).unwrap();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&pa), bits(&pb));
    // and in the attention maps: no latent of any layer reads those tokens
    for (layer, map) in r
        .attention_maps(&h.states, &h.mask, Some(&w))
        .unwrap()
        .iter()
        .enumerate()
    {
        let t = zero.dim(1).unwrap();
        let on_tokens = map.narrow(3, 0, t).unwrap();
        let read = max_abs(
            &on_tokens
                .broadcast_mul(&zero.unsqueeze(1).unwrap().unsqueeze(1).unwrap())
                .unwrap(),
        );
        assert!(
            read < 1e-30,
            "layer {layer}: weight-0 tokens get attention {read}"
        );
    }
}

/// Attention mass of the first layer (its queries are the learned latents, the same whatever
/// the weights) on the tokens where `sel` is 1, per head and latent: [B,H,N].
fn first_layer_mass(enc: &Encoder, p: &str, w: f64, sel: &Tensor) -> Tensor {
    let (h, _) = enc
        .weighted_hidden_states(&[&format!("a ({p}:1) cube")], Comfy)
        .unwrap();
    let weights = (sel.affine(w - 1.0, 1.0)).unwrap();
    let maps = enc
        .resampler()
        .unwrap()
        .attention_maps(&h.states, &h.mask, Some(&weights))
        .unwrap();
    let t = sel.dim(1).unwrap();
    maps[0]
        .narrow(3, 0, t)
        .unwrap()
        .broadcast_mul(&sel.unsqueeze(1).unwrap().unsqueeze(1).unwrap())
        .unwrap()
        .sum(3)
        .unwrap()
}

#[test]
fn the_attention_mass_of_weighted_tokens_scales_by_w_before_renormalisation() {
    let enc = encoder();
    // the tokens of "red" in "a red cube": weight them through a selection mask
    let (_, w) = enc
        .weighted_hidden_states(&["a (red:2) cube"], Comfy)
        .unwrap();
    let sel = w.unwrap().ne(1f64).unwrap().to_dtype(DType::F32).unwrap();
    let m1 = first_layer_mass(&enc, "red", 1.0, &sel);
    for w in [0.25, 0.5, 2.0, 4.0] {
        let mw = first_layer_mass(&enc, "red", w, &sel);
        // odds after / odds before = w: exp(s + ln w) = w exp(s), then the softmax renormalises
        let odds = |m: &Tensor| (m / (1.0 - m).unwrap()).unwrap();
        let ratio = (odds(&mw) / odds(&m1)).unwrap();
        let err = max_abs(&(ratio - w).unwrap());
        assert!(err < 1e-3 * w as f32, "w {w}: odds ratio off by {err}");
    }
}

#[test]
fn the_conditioning_moves_away_monotonically_as_the_weight_leaves_one() {
    let enc = encoder();
    let plain = embeds(&enc, "a red cube left of a blue sphere", PromptSyntax::None);
    let dist = |w: f64| {
        let c = embeds(
            &enc,
            &format!("a (red cube:{w}) left of a blue sphere"),
            Comfy,
        );
        max_diff(&c, &plain)
    };
    let up: Vec<f32> = [1.0, 1.2, 1.5, 2.0, 4.0, 8.0].map(dist).to_vec();
    let down: Vec<f32> = [1.0, 0.8, 0.5, 0.25, 0.0].map(dist).to_vec();
    assert_eq!(up[0], 0.0);
    for d in [&up, &down] {
        assert!(d.windows(2).all(|p| p[1] > p[0]), "not monotone: {d:?}");
    }
}

#[test]
fn a_batch_mixing_weighted_and_plain_prompts_equals_each_prompt_alone() {
    let enc = encoder();
    let prompts = [
        "a (red:1.5) cube left of a ((blue)) sphere",
        "a plain prompt with more tokens than the first one has, for padding",
        "",
        "(cat:0) under a [table]",
    ];
    let batch = enc.encode_with(&prompts, Comfy).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = enc.encode_with(&[p], Comfy).unwrap();
        let row = batch.prompt_embeds.narrow(0, i, 1).unwrap();
        assert_close(p, &row, &alone.prompt_embeds, 1e-5);
        let pooled = batch.pooled.narrow(0, i, 1).unwrap();
        assert_close(p, &pooled, &alone.pooled, 1e-5);
    }
}

#[test]
fn bad_weights_are_errors_naming_the_span_in_the_library_and_the_cli() {
    let enc = encoder();
    let err = |p: &[&str]| match enc.encode_with(p, Comfy) {
        Ok(_) => panic!("{p:?} was accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(&["fine", "a (red:abc) cube"]);
    assert!(
        e.contains("prompt 1") && e.contains("\"(red:abc)\"") && e.contains("not a number"),
        "{e}"
    );
    let e = err(&["(red:1e9)"]);
    assert!(e.contains("out of range") && e.contains("(red:1e9)"), "{e}");

    let d = tiny();
    let out = scratch("weighting-cli").join("cond.safetensors");
    let run = |prompt: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qwenclip"))
            .args(["encode", "--model"])
            .arg(d.join("model"))
            .arg("--adapter")
            .arg(d.join("adapter"))
            .args(["--prompt", prompt, "--prompt-syntax", "comfy", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let bad = run("a (red:-2) cube");
    assert_eq!(bad.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("(red:-2)") && msg.contains("out of range"),
        "{msg}"
    );
    // and a good one writes what the library gives
    assert!(run("a (red:1.5) cube").status.success());
    let got = load(&out);
    assert_eq!(
        bits(&got["prompt_embeds"]),
        bits(&embeds(&enc, "a (red:1.5) cube", Comfy))
    );
}

#[test]
fn each_token_takes_the_weight_of_the_text_it_covers() {
    use qwenclip::tokenizer::syntax::WeightedPrompt;
    use qwenclip::tokenizer::PromptTokenizer;
    let t = PromptTokenizer::load(&qwen_tokenizer()).unwrap();
    let w = |p: &str| {
        t.token_weights(&WeightedPrompt::parse(p, Comfy).unwrap())
            .unwrap()
    };
    // " red" carries the space before it, which does not vote
    assert_eq!(w("a (red:2) cube"), vec![1.0, 2.0, 1.0]);
    // multi-byte characters split into several tokens: byte offsets, not characters
    let cjk = w("(猫:2)と犬 🐱");
    let text = "猫と犬 🐱";
    let ids = t.ids(text).unwrap();
    assert_eq!(cjk.len(), ids.len());
    assert!(cjk[0] == 2.0 && cjk[cjk.len() - 1] == 1.0, "{cjk:?}");
    // one token across two spans: the mean over its bytes
    let blend = w("(un:0)believable");
    assert!(
        blend.iter().any(|&x| x > 0.0 && x < 1.0) || blend.contains(&0.0),
        "{blend:?}"
    );
}
