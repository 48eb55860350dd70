//! Parity with PyTorch `transformers` / `peft` on the committed fixtures
//! (`tests/fixtures/parity`, made by `tests/reference/make_fixtures.py`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qwenclip::formats::pth::KeyMap;
use qwenclip::llm::Qwen3;
use qwenclip::lora::Lora;
use qwenclip::resampler::pth::load_resampler;
use qwenclip::resampler::Resampler;
use qwenclip::{ForwardMode, LoraMode};

const MODELS: [&str; 3] = ["gqa2_untied", "mha_tied", "gqa4_hd32_bf16"];
/// f32 against a float64 reference (which `transformers` computes partly in f32).
const TOL: f32 = 1e-4;

/// Only positions that hold tokens are compared: padded rows are defined by neither side's contract.
fn valid_rows(x: &Tensor, len: usize, b: usize) -> Tensor {
    x.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap()
}

fn check_batch(what: &str, got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) {
    for (b, len) in lengths(mask).into_iter().enumerate() {
        assert_close(
            &format!("{what} prompt {b}"),
            &valid_rows(got, len, b),
            &valid_rows(want, len, b),
            TOL,
        );
    }
}

#[test]
fn hidden_states_match_transformers_for_every_shape() {
    for name in MODELS {
        let case = load(&parity(&format!("cases/{name}.safetensors")));
        let (ids, mask) = ids_and_mask(&case);
        let model =
            Qwen3::load(&parity(&format!("models/{name}")), DType::F32, &Device::Cpu).unwrap();
        for (layer, key) in [(-1, "hidden_last"), (-2, "hidden_penult")] {
            let got = model
                .forward(&ids, &mask, layer, ForwardMode::Fast)
                .unwrap();
            check_batch(&format!("{name} {key}"), &got, &case[key], &mask);
        }
    }
}

#[test]
fn a_prompt_alone_equals_the_same_prompt_in_a_padded_batch() {
    for name in MODELS {
        let case = load(&parity(&format!("cases/{name}.safetensors")));
        let (ids, mask) = ids_and_mask(&case);
        let model =
            Qwen3::load(&parity(&format!("models/{name}")), DType::F32, &Device::Cpu).unwrap();
        let batch = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
        for (b, len) in lengths(&mask).into_iter().enumerate() {
            let alone_ids = ids.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap();
            let alone = model
                .forward(&alone_ids, &[vec![1; len]], -1, ForwardMode::Fast)
                .unwrap();
            assert_close(
                &format!("{name} prompt {b} alone vs reference"),
                &alone,
                &case[&format!("hidden_last_single_{b}")],
                TOL,
            );
            assert_close(
                &format!("{name} prompt {b} alone vs in batch"),
                &alone,
                &valid_rows(&batch, len, b),
                1e-5,
            );
        }
    }
}

#[test]
fn peft_lora_matches_merged_and_unmerged() {
    for name in MODELS {
        let case = load(&parity(&format!("cases/{name}.safetensors")));
        let (ids, mask) = ids_and_mask(&case);
        let dir = parity(&format!("models/{name}"));
        let mut model = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let lora = Lora::load(&dir.join("lora"), &Device::Cpu).unwrap();
        model.set_lora(lora.clone(), LoraMode::Unmerged).unwrap();
        let unmerged = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
        check_batch(
            &format!("{name} LoRA unmerged"),
            &unmerged,
            &case["hidden_last_lora"],
            &mask,
        );
        model.set_lora(lora, LoraMode::Merged).unwrap();
        let merged = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
        check_batch(
            &format!("{name} LoRA merged"),
            &merged,
            &case["hidden_last_lora"],
            &mask,
        );
        // Removing a merged LoRA restores the original weights exactly (they are re-read).
        model.clear_lora().unwrap();
        let base = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
        check_batch(
            &format!("{name} after clear"),
            &base,
            &case["hidden_last"],
            &mask,
        );
    }
}

#[test]
fn training_path_agrees_with_inference_path() {
    for name in MODELS {
        let case = load(&parity(&format!("cases/{name}.safetensors")));
        let (ids, mask) = ids_and_mask(&case);
        let dir = parity(&format!("models/{name}"));
        let mut model = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
        model
            .set_lora(
                Lora::load(&dir.join("lora"), &Device::Cpu).unwrap(),
                LoraMode::Unmerged,
            )
            .unwrap();
        let fast = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
        let diff = model
            .forward(&ids, &mask, -1, ForwardMode::Differentiable)
            .unwrap();
        check_batch(
            &format!("{name} fast vs differentiable"),
            &fast,
            &diff,
            &mask,
        );
        check_batch(
            &format!("{name} differentiable vs reference"),
            &diff,
            &case["hidden_last_lora"],
            &mask,
        );
    }
}

fn resampler_case_matches(r: &Resampler, what: &str) {
    let case = load(&parity("resampler/case.safetensors"));
    let mask = case["attention_mask"].to_dtype(DType::F32).unwrap();
    for path in [ForwardMode::Fast, ForwardMode::Differentiable] {
        let (embeds, pooled) = r.forward(&case["hidden"], &mask, path).unwrap();
        assert_close(
            &format!("{what} {path:?} prompt_embeds"),
            &embeds,
            &case["prompt_embeds"],
            TOL,
        );
        assert_close(
            &format!("{what} {path:?} pooled"),
            &pooled,
            &case["pooled"],
            TOL,
        );
    }
    let lens = lengths(&mask.to_dtype(DType::U8).unwrap().to_vec2::<u8>().unwrap());
    for b in 0..2 {
        let h = case["hidden"]
            .narrow(0, b, 1)
            .unwrap()
            .narrow(1, 0, lens[b])
            .unwrap();
        let m = Tensor::ones((1, lens[b]), DType::F32, &Device::Cpu).unwrap();
        let (e, p) = r.forward(&h, &m, ForwardMode::Fast).unwrap();
        assert_close(
            &format!("{what} prompt {b} alone"),
            &e,
            &case[&format!("prompt_embeds_single_{b}")],
            TOL,
        );
        assert_close(
            &format!("{what} pooled {b} alone"),
            &p,
            &case[&format!("pooled_single_{b}")],
            TOL,
        );
    }
}

#[test]
fn resampler_matches_pytorch_including_empty_prompt() {
    let r = Resampler::load(
        &parity("resampler/resampler.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    resampler_case_matches(&r, "safetensors");
}

#[test]
fn resampler_from_nested_pth_through_key_map() {
    let map = KeyMap::load(&parity("resampler/keymap.json")).unwrap();
    let r = load_resampler(
        &parity("resampler/resampler_nested.pth"),
        &map,
        &Device::Cpu,
    )
    .unwrap();
    let reference = Resampler::load(
        &parity("resampler/resampler.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        r.config(),
        reference.config(),
        "config inferred from the .pth shapes + key map"
    );
    resampler_case_matches(&r, "pth");
}

#[test]
fn full_chain_qwen3_lora_resampler_matches() {
    let case = load(&parity("chain.safetensors"));
    let (ids, mask) = ids_and_mask(&case);
    let dir = parity("models/gqa2_untied");
    let mut model = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
    model
        .set_lora(
            Lora::load(&dir.join("lora"), &Device::Cpu).unwrap(),
            LoraMode::Merged,
        )
        .unwrap();
    let r = Resampler::load(
        &parity("resampler/resampler.safetensors"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let h = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
    let m = case["attention_mask"].to_dtype(DType::F32).unwrap();
    let (embeds, pooled) = r.forward(&h, &m, ForwardMode::Fast).unwrap();
    assert_close("chain prompt_embeds", &embeds, &case["prompt_embeds"], TOL);
    assert_close("chain pooled", &pooled, &case["pooled"], TOL);
}

#[test]
fn bf16_compute_stays_near_the_f32_reference() {
    // Documented tolerance for bf16 activations: 8 bits of mantissa through a few layers.
    let name = "gqa4_hd32_bf16";
    let case = load(&parity(&format!("cases/{name}.safetensors")));
    let (ids, mask) = ids_and_mask(&case);
    let model = Qwen3::load(
        &parity(&format!("models/{name}")),
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let got = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
    for (b, len) in lengths(&mask).into_iter().enumerate() {
        let (g, w) = (
            valid_rows(&got, len, b),
            valid_rows(&case["hidden_last"], len, b),
        );
        let d = max_diff(&g, &w);
        let scale = max_diff(&w, &w.zeros_like().unwrap());
        assert!(
            d <= 0.05 * scale,
            "bf16 prompt {b}: max diff {d} vs max |x| {scale}"
        );
    }
}
