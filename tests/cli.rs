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
    dev_tiny(&d);
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

/// The README's first line as an installed user runs it: `qwenclip-dev tiny`, then
/// `qwenclip encode`, both from a folder outside the source tree, relative paths only, and
/// nothing from the build environment.
#[test]
fn readme_smoke_run_works_from_a_folder_outside_the_source_tree() {
    let work = std::env::temp_dir().join(format!("qwenclip-outside-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    assert!(
        !work.starts_with(root()),
        "{} is inside the repository",
        work.display()
    );
    let run = |exe: &str, args: &[&str]| {
        stdout_of(
            Command::new(exe)
                .args(args)
                .current_dir(&work)
                .env_remove("CARGO_MANIFEST_DIR"),
        )
    };
    run(env!("CARGO_BIN_EXE_qwenclip-dev"), &["tiny", "--out", "qc"]);
    let stdout = run(
        env!("CARGO_BIN_EXE_qwenclip"),
        &[
            "encode",
            "--model",
            "qc/model",
            "--adapter",
            "qc/adapter",
            "--prompt",
            "a red cube left of a blue sphere",
            "--prompt",
            "",
            "--out",
            "qc/cond.safetensors",
        ],
    );
    assert!(stdout.contains("prompt_embeds [2, 77, 2048]"), "{stdout}");
    let t = load(&work.join("qc/cond.safetensors"));
    assert_eq!(t["prompt_embeds"].dims(), &[2, 77, 2048]);
    assert_eq!(t["pooled_prompt_embeds"].dims(), &[2, 1280]);
    // The built-in tokenizer is the repository's Qwen3 one.
    assert!(
        std::fs::read(work.join("qc/model/tokenizer.json")).unwrap()
            == std::fs::read(qwen_tokenizer()).unwrap()
    );
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn developer_tools_are_not_commands_of_qwenclip() {
    let (_, help, _) = qwenclip(&["--help"], &[]);
    assert!(help.contains("encode"), "{help}");
    for dev in [
        "tiny",
        "random-model",
        "bench-encode",
        "bench-train",
        "bench-ffi",
    ] {
        assert!(
            !help.contains(dev),
            "`qwenclip --help` lists {dev}:\n{help}"
        );
        let (ok, _, err) = qwenclip(&[dev, "--help"], &[]);
        assert!(
            !ok && err.contains("unrecognized subcommand"),
            "{dev}: {err}"
        );
    }
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
    // Without HF_HUB_OFFLINE a cached model is used without the network, and one that is not
    // cached, where the hub cannot be reached, gets one sentence saying how to get it.
    let no_hub = [
        ("HF_HOME", home.as_path()),
        ("HF_ENDPOINT", Path::new("http://127.0.0.1:9")),
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
        &no_hub,
    );
    assert!(ok, "a cached model needs no network: {err}");
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
        &no_hub,
    );
    assert!(
        !ok && err.contains("is not in the Hugging Face cache")
            && err.contains("the download failed")
            && err.contains("huggingface-cli download qwenclip/absent"),
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

#[test]
fn distillation_pipeline_from_the_command_line() {
    let d = scratch("cli-distill");
    dev_tiny(&d);
    let captions: String = (0..24)
        .map(|i| {
            format!(
                "a {} box number {i} on a table\n",
                ["red", "blue", "green"][i % 3]
            )
        })
        .collect();
    std::fs::write(d.join("captions.txt"), captions).unwrap();
    let cache = d.join("cache");
    let (ok, out, err) = qwenclip(
        &[
            "cache-targets",
            "--teacher",
            s(&d.join("teacher")),
            "--captions",
            s(&d.join("captions.txt")),
            "--out",
            s(&cache),
            "--shard-size",
            "8",
        ],
        &[],
    );
    assert!(ok && out.contains("24 captions in 3 shards"), "{out}{err}");
    let run = d.join("run");
    let small = [
        "--resampler-width",
        "32",
        "--resampler-heads",
        "4",
        "--resampler-layers",
        "1",
        "--lora-r",
        "4",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--held-out",
        "0.25",
    ];
    let model = d.join("model");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--cache",
        s(&cache),
        "--out",
        s(&run),
        "--steps",
        "4",
    ];
    args.extend(small);
    let (ok, out, err) = qwenclip(&args, &[]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("held-out: mse embeds") && err.contains("checkpoint and adapter saved"),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"], 4);
    let (ok, out, err) = qwenclip(
        &[
            "eval",
            "--model",
            s(&d.join("model")),
            "--adapter",
            s(&run.join("adapter")),
            "--cache",
            s(&cache),
            "--held-out",
            "0.25",
        ],
        &[],
    );
    assert!(
        ok && out.contains("| MSE prompt_embeds |")
            && out.contains("| pairwise cosine between prompts, student / teacher |"),
        "{out}{err}"
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(json["count"], 6);
    assert!(
        (json["mse_embeds"].as_f64().unwrap()
            - summary["final_eval"]["mse_embeds"].as_f64().unwrap())
        .abs()
            < 1e-6,
        "eval agrees with the run's last evaluation"
    );
    let (ok, _, err) = qwenclip(
        &[
            "encode",
            "--model",
            s(&d.join("model")),
            "--adapter",
            s(&run.join("adapter")),
            "--prompt",
            "a red box",
            "--out",
            s(&d.join("c.safetensors")),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(
        load(&d.join("c.safetensors"))["prompt_embeds"].dims(),
        &[1, 77, 64]
    );

    // The vision objective, judged by the tiny UNet of the teacher's widths.
    let unet = d.join("unet");
    let vision_run = d.join("run-vision");
    let teacher = d.join("teacher");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--cache",
        s(&cache),
        "--out",
        s(&vision_run),
        "--steps",
        "3",
        "--objective",
        "vision",
        "--unet",
        s(&unet),
        "--teacher",
        s(&teacher),
        "--resolution",
        "32",
        "--denoise-steps",
        "2",
        "--guidance-range",
        "3,4",
    ];
    args.extend(small);
    let (ok, out, err) = qwenclip(&args, &[]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("judge UNet"), "{err}");
    let metrics = std::fs::read_to_string(vision_run.join("metrics.jsonl")).unwrap();
    let steps = metrics
        .lines()
        .filter(|l| l.contains("\"loss_vision\""))
        .count();
    assert_eq!(steps, 3, "{metrics}");
    assert!(
        metrics.contains("\"vision_loss\""),
        "held-out vision loss: {metrics}"
    );
    let ckpt = qwenclip::training::trainer::read_state(&vision_run.join("checkpoint.safetensors"))
        .unwrap();
    assert_eq!(ckpt.config.vision.denoise_steps, 2);
    assert_eq!(ckpt.config.vision.guidance_grid(), vec![3.0, 3.5, 4.0]);
    // Without a judge the vision objective says what is missing.
    let none = d.join("run-vision-none");
    let args = [
        "train",
        "--model",
        s(&model),
        "--cache",
        s(&cache),
        "--out",
        s(&none),
        "--objective",
        "vision",
    ];
    let (ok, _, err) = qwenclip(&args, &[]);
    assert!(!ok && err.contains("--unet"), "{err}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_resumes() {
    let d = scratch("cli-ctrlc");
    dev_tiny(&d);
    let captions: String = (0..16).map(|i| format!("caption {i}\n")).collect();
    std::fs::write(d.join("captions.txt"), captions).unwrap();
    let cache = d.join("cache");
    assert!(
        qwenclip(
            &[
                "cache-targets",
                "--teacher",
                s(&d.join("teacher")),
                "--captions",
                s(&d.join("captions.txt")),
                "--out",
                s(&cache)
            ],
            &[]
        )
        .0
    );
    let run = d.join("run");
    let small = [
        "--resampler-width",
        "32",
        "--resampler-heads",
        "4",
        "--resampler-layers",
        "1",
        "--lora-r",
        "4",
        "--batch-size",
        "2",
        "--save-every",
        "0",
        "--eval-every",
        "0",
    ];
    let model = d.join("model");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--cache",
        s(&cache),
        "--out",
        s(&run),
        "--steps",
        "100000",
    ];
    args.extend(small);
    let child = Command::new(env!("CARGO_BIN_EXE_qwenclip"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then interrupt.
    let metrics = run.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.matches("grad_norm").count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted: resume with --resume"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["interrupted"], true);
    let done = summary["steps"].as_u64().unwrap();
    let state =
        qwenclip::training::trainer::read_state(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(
        state.t, done,
        "the checkpoint holds the step reached at Ctrl-C"
    );
    let target = (done + 2).to_string();
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--cache",
        s(&cache),
        "--out",
        s(&run),
        "--steps",
        &target,
        "--resume",
        s(&run),
    ];
    args.extend(small);
    let (ok, out, err) = qwenclip(&args, &[]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["steps"].as_u64().unwrap(), done + 2);
}
