//! Bad input gives a clear error that names the file and what was expected.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use qwenclip::formats::pth::KeyMap;
use qwenclip::llm::Qwen3;
use qwenclip::resampler::pth::load_resampler;
use qwenclip::{Encoder, EncoderOptions, Error};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn model_copy(name: &str) -> std::path::PathBuf {
    let d = scratch(&format!("bad-{name}"));
    copy_dir(&parity("models/gqa2_untied"), &d);
    std::fs::copy(qwen_tokenizer(), d.join("tokenizer.json")).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    match Qwen3::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            msg.contains(p),
            "error message {msg:?} should mention {p:?}"
        );
    }
}

#[test]
fn missing_config_json() {
    let d = model_copy("no-config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_mentions(&load_err(&d), &["config.json", "not found"]);
}

#[test]
fn corrupt_config_json() {
    let d = model_copy("corrupt-config");
    std::fs::write(d.join("config.json"), "{\"hidden_size\": 64, ").unwrap();
    assert_mentions(&load_err(&d), &["config.json", "invalid Qwen3 config.json"]);
    std::fs::write(d.join("config.json"), r#"{"model_type":"llama","vocab_size":1,"hidden_size":1,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":1,"num_key_value_heads":1}"#).unwrap();
    assert_mentions(&load_err(&d), &["config.json", "model_type", "qwen3"]);
}

#[test]
fn truncated_safetensors() {
    let d = model_copy("truncated");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &load_err(&d),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn wrong_tensor_shape_names_tensor_and_both_shapes() {
    let d = model_copy("wrong-shape");
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    assert_mentions(
        &load_err(&d),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );
}

#[test]
fn missing_tokenizer() {
    let d = model_copy("no-tokenizer");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let err = Encoder::load(&d, None, EncoderOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert_mentions(&err, &["tokenizer.json", "not found"]);
}

#[test]
fn adapter_for_another_base_names_both_shapes() {
    let tiny = tiny();
    let d = model_copy("other-base");
    let err = Encoder::load(&d, Some(&tiny.join("adapter")), EncoderOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    assert_mentions(
        &err.to_string(),
        &["hidden 32 x 2 layers", "hidden 64 x 2 layers"],
    );
}

#[test]
fn bare_lora_for_another_base_names_both_shapes() {
    let d = model_copy("other-lora");
    let err = Encoder::load(
        &d,
        Some(&parity("models/mha_tied/lora")),
        EncoderOptions::default(),
    )
    .err()
    .expect("must fail");
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    assert_mentions(&err.to_string(), &["q_proj", "[48,", "[64,"]);
}

#[test]
fn pth_that_is_not_a_zip() {
    let err = load_resampler(
        &parity("resampler/not_a_zip.pth"),
        &KeyMap::default(),
        &Device::Cpu,
    )
    .err()
    .expect("must fail")
    .to_string();
    assert_mentions(&err, &["not_a_zip.pth", "not a zip-format .pth"]);
}

#[test]
fn pth_without_key_map_says_what_is_missing() {
    let err = load_resampler(
        &parity("resampler/resampler_nested.pth"),
        &KeyMap {
            nested_key: Some("state_dict".into()),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .err()
    .expect("must fail")
    .to_string();
    assert_mentions(
        &err,
        &[
            "resampler_nested.pth",
            "proj_in.weight",
            "key map",
            "module.",
        ],
    );
}

#[test]
fn corrupt_adapter_manifest() {
    let d = scratch("bad-manifest");
    copy_dir(&tiny().join("adapter"), &d);
    std::fs::write(d.join("qwenclip.json"), "not json").unwrap();
    let err = Encoder::load(&tiny().join("model"), Some(&d), EncoderOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert_mentions(&err, &["qwenclip.json", "invalid adapter manifest"]);
}

#[test]
fn hidden_layer_out_of_range() {
    let opts = EncoderOptions {
        hidden_layer: Some(-4),
        ..Default::default()
    };
    let err = Encoder::load(&tiny().join("model"), None, opts)
        .err()
        .expect("must fail")
        .to_string();
    assert_mentions(&err, &["hidden layer -4", "2 layers"]);
}

#[test]
fn tokenizer_bigger_than_the_model_vocab() {
    let d = model_copy("vocab");
    let enc = Encoder::load(&d, None, EncoderOptions::default()).unwrap();
    let err = enc
        .hidden_states(
            &["a long word list of rare tokens"],
            qwenclip::ForwardMode::Fast,
        )
        .err()
        .expect("must fail")
        .to_string();
    assert_mentions(
        &err,
        &[
            "tokenizer.json",
            "vocab_size is 1024",
            "do not belong together",
        ],
    );
}
