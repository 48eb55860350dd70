//! The Encoder end to end on the seeded tiny model: tokenization, token limit, empty prompt,
//! padding invariance, adapter swap without reloading.

mod common;

use candle_core::DType;
use common::*;
use qwenclip::tokenizer::PromptTokenizer;
use qwenclip::{Encoder, EncoderOptions};

#[test]
fn qwen_tokenizer_matches_the_reference_ids() {
    let t = PromptTokenizer::load(&qwen_tokenizer()).unwrap();
    assert_eq!(t.ids("Hello, world!").unwrap(), vec![9707, 11, 1879, 0]);
    assert_eq!(t.ids("<|im_start|>user\n").unwrap(), vec![151644, 872, 198]);
    assert!(t.ids("").unwrap().is_empty());
}

#[test]
fn long_prompts_are_truncated_with_a_warning_counting_dropped_tokens() {
    let t = PromptTokenizer::load(&qwen_tokenizer()).unwrap();
    let long = "a red cube left of a blue sphere ".repeat(20);
    let n = t.ids(&long).unwrap().len();
    let b = t.encode_batch(&[&long, "short"], 16).unwrap();
    assert_eq!(b.lengths[0], 16);
    assert_eq!(b.warnings.len(), 1);
    assert!(
        b.warnings[0].contains(&format!("the last {} were dropped", n - 16)),
        "{}",
        b.warnings[0]
    );
    assert_eq!(b.mask[1].iter().filter(|&&m| m == 1).count(), b.lengths[1]);
}

#[test]
fn conditioning_has_sdxl_shapes_and_is_finite_for_the_empty_prompt() {
    let d = tiny();
    let enc = Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap();
    let c = enc.encode(&["a cat under a table", ""]).unwrap();
    assert_eq!(c.prompt_embeds.dims(), &[2, 77, 2048]);
    assert_eq!(c.pooled.dims(), &[2, 1280]);
    assert_eq!(c.prompt_embeds.dtype(), DType::F32);
    let s = c
        .prompt_embeds
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(s.is_finite() && s > 0.0);
    // Empty prompt alone gives the same as inside the batch.
    let alone = enc.encode(&[""]).unwrap();
    assert_close(
        "empty prompt alone vs in batch",
        &alone.prompt_embeds,
        &c.prompt_embeds.narrow(0, 1, 1).unwrap(),
        1e-5,
    );
}

#[test]
fn a_prompt_alone_and_in_a_padded_batch_give_the_same_conditioning() {
    let d = tiny();
    let enc = Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap();
    let prompts = [
        "a red cube to the left of a blue sphere, no people",
        "dog",
        "a very long description of a quiet harbour at dawn with fishing boats",
    ];
    let batch = enc.encode(&prompts).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let one = enc.encode(&[p]).unwrap();
        assert_close(
            &format!("prompt {i} embeds"),
            &one.prompt_embeds,
            &batch.prompt_embeds.narrow(0, i, 1).unwrap(),
            1e-5,
        );
        assert_close(
            &format!("prompt {i} pooled"),
            &one.pooled,
            &batch.pooled.narrow(0, i, 1).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn swapping_the_adapter_does_not_need_a_reload() {
    let d = tiny();
    let mut enc = Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap();
    let with = enc
        .hidden_states(&["a cat"], qwenclip::ForwardMode::Fast)
        .unwrap()
        .states;
    enc.set_adapter(None).unwrap();
    let without = enc
        .hidden_states(&["a cat"], qwenclip::ForwardMode::Fast)
        .unwrap()
        .states;
    assert!(
        max_diff(&with, &without) > 1e-3,
        "the LoRA must change the hidden states"
    );
    assert!(
        enc.encode(&["a cat"]).is_err(),
        "no adapter: no conditioning"
    );
    enc.set_adapter(Some(&d.join("adapter"))).unwrap();
    let again = enc
        .hidden_states(&["a cat"], qwenclip::ForwardMode::Fast)
        .unwrap()
        .states;
    assert_close("adapter re-attached", &again, &with, 1e-6);
    let fresh = Encoder::load(&d.join("model"), None, EncoderOptions::default()).unwrap();
    let base = fresh
        .hidden_states(&["a cat"], qwenclip::ForwardMode::Fast)
        .unwrap()
        .states;
    assert_close("removed adapter = fresh base", &without, &base, 0.0);
}

#[test]
fn token_limit_comes_from_the_adapter_unless_overridden() {
    let d = tiny();
    let enc = Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        EncoderOptions::default(),
    )
    .unwrap();
    assert_eq!(enc.max_tokens(), 256);
    let opts = EncoderOptions {
        max_tokens: Some(8),
        ..Default::default()
    };
    let enc = Encoder::load(&d.join("model"), Some(&d.join("adapter")), opts).unwrap();
    assert_eq!(enc.max_tokens(), 8);
    let h = enc
        .hidden_states(
            &["one two three four five six seven eight nine ten eleven"],
            qwenclip::ForwardMode::Fast,
        )
        .unwrap();
    assert_eq!(h.states.dims()[1], 8);
    assert_eq!(h.tokens.warnings.len(), 1);
}

#[test]
fn tiny_generator_is_deterministic() {
    let a = scratch("tiny-det-a");
    let b = scratch("tiny-det-b");
    qwenclip::dev::tiny::write_tiny(&a, qwenclip::dev::QWEN_TOKENIZER, 5).unwrap();
    qwenclip::dev::tiny::write_tiny(&b, qwenclip::dev::QWEN_TOKENIZER, 5).unwrap();
    for f in [
        "model/model.safetensors",
        "adapter/adapter_model.safetensors",
        "adapter/resampler.safetensors",
    ] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two runs with the same seed"
        );
    }
}
