//! A LoRA written by our trainer, loaded by Python `peft` (fixture from
//! `tests/reference/peft_interop.py`), gives the hidden states our loader gives.

mod common;

use candle_core::{DType, Device};
use common::*;
use qwenclip::llm::Qwen3;
use qwenclip::lora::Lora;
use qwenclip::{ForwardMode, LoraMode};
use sha2::Digest;

#[test]
fn peft_and_qwenclip_agree_on_a_trainer_written_lora() {
    let fixture = root().join("tests/fixtures/interop");
    let model_dir = tiny().join("model");
    let weights = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let meta =
        qwenclip::formats::safetensors::read_metadata(&fixture.join("peft_hidden.safetensors"))
            .unwrap();
    let sha: String = sha2::Sha256::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        meta["model_sha256"], sha,
        "the tiny model changed: regenerate the interop fixture"
    );
    let case = load(&fixture.join("peft_hidden.safetensors"));
    let (ids, mask) = ids_and_mask(&case);
    let mut model = Qwen3::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
    model
        .set_lora(
            Lora::load(&fixture, &Device::Cpu).unwrap(),
            LoraMode::Merged,
        )
        .unwrap();
    let h = model.forward(&ids, &mask, -1, ForwardMode::Fast).unwrap();
    for (b, len) in lengths(&mask).into_iter().enumerate() {
        let got = h.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap();
        let want = case["hidden_last_lora"]
            .narrow(0, b, 1)
            .unwrap()
            .narrow(1, 0, len)
            .unwrap();
        assert_close(&format!("prompt {b}"), &got, &want, 1e-4);
    }
}
