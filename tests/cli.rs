//! The `qwenclip` binary as a user runs it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn qwenclip(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwenclip"));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_writes_diffusers_named_tensors_and_hidden_states() {
    let d = scratch("cli-encode");
    let (ok, _, err) = qwenclip(&["tiny", "--out", s(&d)], &[]);
    assert!(ok, "{err}");
    let out = d.join("cond.safetensors");
    let (ok, stdout, err) = qwenclip(
        &[
            "encode",
            "--model",
            s(&d.join("model")),
            "--adapter",
            s(&d.join("adapter")),
            "--prompt",
            "a fox under a bridge",
            "--prompt",
            "",
            "--out",
            s(&out),
            "--dump-hidden",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("prompt_embeds [2, 77, 2048]"), "{stdout}");
    let t = load(&out);
    assert_eq!(t["prompt_embeds"].dims(), &[2, 77, 2048]);
    assert_eq!(t["pooled_prompt_embeds"].dims(), &[2, 1280]);
    assert_eq!(t["llm_hidden_states"].dims()[2], 32);
    assert_eq!(
        t["attention_mask"].dims(),
        &t["llm_hidden_states"].dims()[..2]
    );
    // Same numbers as the library gives.
    let enc = qwenclip::Encoder::load(
        &d.join("model"),
        Some(&d.join("adapter")),
        Default::default(),
    )
    .unwrap();
    let c = enc.encode(&["a fox under a bridge", ""]).unwrap();
    assert_close("cli vs library", &t["prompt_embeds"], &c.prompt_embeds, 0.0);
}

#[test]
fn bare_lora_dumps_hidden_states_and_explains_without_dump_hidden() {
    let tiny = tiny();
    let lora = scratch("cli-bare-lora");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny.join("adapter").join(f), lora.join(f)).unwrap();
    }
    let d = tiny.join("model");
    let out = lora.join("h.safetensors");
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            s(&d),
            "--adapter",
            s(&lora),
            "--prompt",
            "hi",
            "--out",
            s(&out),
        ],
        &[],
    );
    assert!(
        !ok && err.contains("no resampler") && err.contains("--dump-hidden"),
        "{err}"
    );
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            s(&d),
            "--adapter",
            s(&lora),
            "--prompt",
            "hi",
            "--out",
            s(&out),
            "--dump-hidden",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(!load(&out).contains_key("prompt_embeds"));
}

#[test]
fn long_prompt_warning_reaches_the_user() {
    let d = tiny();
    let out = scratch("cli-long").join("o.safetensors");
    let long = "word ".repeat(300).trim_end().to_string();
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            s(&d.join("model")),
            "--adapter",
            s(&d.join("adapter")),
            "--prompt",
            &long,
            "--out",
            s(&out),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: prompt 0 has 300 tokens; the last 44 were dropped (limit 256)"),
        "{err}"
    );
}

#[test]
fn hub_id_resolves_from_the_offline_cache() {
    let tiny = tiny();
    let home = scratch("cli-hf-home");
    let repo = home.join("hub/models--qwenclip--tiny");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(tiny.join("model").join(f), snap.join(f)).unwrap();
    }
    let out = home.join("o.safetensors");
    let env = [
        ("HF_HOME", home.as_path()),
        ("HF_HUB_OFFLINE", Path::new("1")),
    ];
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            "qwenclip/tiny",
            "--adapter",
            s(&tiny.join("adapter")),
            "--prompt",
            "x",
            "--out",
            s(&out),
        ],
        &env,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            "qwenclip/absent",
            "--prompt",
            "x",
            "--out",
            s(&out),
        ],
        &env,
    );
    assert!(
        !ok && err.contains("qwenclip/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn info_describes_model_and_adapter() {
    let d = tiny();
    let (ok, out, err) = qwenclip(&["info", s(&d.join("model"))], &[]);
    assert!(ok && out.contains("hidden 32 x 2 layers"), "{out}{err}");
    let (ok, out, err) = qwenclip(&["info", s(&d.join("adapter"))], &[]);
    assert!(
        ok && out.contains("LoRA: r 4") && out.contains("resampler:"),
        "{out}{err}"
    );
}

#[test]
fn import_resampler_from_pth() {
    let out = scratch("cli-import").join("resampler.safetensors");
    let (ok, stdout, err) = qwenclip(
        &[
            "import-resampler",
            "--pth",
            s(&parity("resampler/resampler_nested.pth")),
            "--key-map",
            s(&parity("resampler/keymap.json")),
            "--out",
            s(&out),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("\"heads\":4"), "{stdout}");
    let a = load(&out);
    let b = load(&parity("resampler/resampler.safetensors"));
    assert_eq!(a.len(), b.len());
    for (k, v) in &b {
        assert_close(k, &a[k], v, 0.0);
    }
}
