//! The SDXL teacher (CLIP-L + CLIP-G) against `transformers` 4.57 references
//! (tests/fixtures/teacher/, made by tests/reference/make_teacher_fixtures.py), the CLIP
//! tokenizer against `CLIPTokenizerFast` with diffusers' settings, the seeded tiny teacher,
//! the CLI, and bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load, root, scratch};
use qwenclip::teacher::{
    ClipTokenizer, Padding, Pooling, Teacher, TeacherSource, MAX_PROMPT_TOKENS, SEQ_LEN,
};

const TOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures/teacher").join(rel)
}

fn expected() -> HashMap<String, Tensor> {
    load(&fixture("expected.safetensors"))
}

fn ids(e: &HashMap<String, Tensor>, key: &str) -> Tensor {
    e[key].to_dtype(DType::U32).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors file with `f` applied to its tensors.
fn edit_safetensors(path: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = load(path);
    f(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

fn err_text<T>(r: qwenclip::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            eprintln!("error as shown: {e}");
            e.to_string()
        }
    }
}

/// Compares every reference output of the fixture batch with `teacher`.
fn check_against_reference(teacher: &Teacher, what: &str) {
    let e = expected();
    let (ids_l, ids_g) = (ids(&e, "input_ids_l"), ids(&e, "input_ids_g"));
    let l = teacher.clip_l().forward(&ids_l).unwrap();
    let g = teacher.clip_g().forward(&ids_g).unwrap();
    assert_close(
        &format!("{what}: CLIP-L hidden_states[-2]"),
        &l.penultimate,
        &e["l_hidden_states_penultimate"],
        TOL,
    );
    assert_close(
        &format!("{what}: CLIP-G hidden_states[-2]"),
        &g.penultimate,
        &e["g_hidden_states_penultimate"],
        TOL,
    );
    let (embeds, pooled) = teacher.encode_ids(&ids_l, &ids_g).unwrap();
    assert_close(
        &format!("{what}: prompt_embeds"),
        &embeds,
        &e["prompt_embeds"],
        TOL,
    );
    assert_close(
        &format!("{what}: pooled_prompt_embeds"),
        &pooled,
        &e["pooled_prompt_embeds"],
        TOL,
    );
    assert_eq!(teacher.output_dims(), (64 + 128, 48));
}

#[test]
fn diffusers_folder_matches_transformers() {
    let t = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    assert!(matches!(t.source(), TeacherSource::Diffusers(_)));
    // SDXL's own configs say eos_token_id 2: transformers pools at argmax(ids).
    assert_eq!(t.clip_g().pooling(), Pooling::ArgmaxId);
    check_against_reference(&t, "diffusers");
}

#[test]
fn single_file_checkpoint_matches_transformers() {
    let t = Teacher::load(&fixture("sdxl_single.safetensors"), &Device::Cpu).unwrap();
    assert!(matches!(t.source(), TeacherSource::SingleFile(_)));
    // Inferred from the tensors: the same shapes as the diffusers configs.
    let (l, g) = (t.clip_l().config(), t.clip_g().config());
    assert_eq!(
        (
            l.hidden_size,
            l.num_hidden_layers,
            l.num_attention_heads,
            l.intermediate_size
        ),
        (64, 3, 1, 128)
    );
    assert_eq!(
        (
            g.hidden_size,
            g.num_hidden_layers,
            g.num_attention_heads,
            g.intermediate_size
        ),
        (128, 2, 2, 192)
    );
    assert_eq!(t.clip_g().pooling(), Pooling::FirstToken(255));
    check_against_reference(&t, "single file");
}

#[test]
fn pooled_position_follows_the_transformers_rule_of_the_config() {
    let e = expected();
    let rows = ids(&e, "pool_rule_ids");
    // eos_token_id == 2 (SDXL's configs): argmax(ids).
    let diffusers = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    let out = diffusers.clip_g().forward(&rows).unwrap();
    assert_eq!(out.pooled_positions, vec![30, 10, 20]);
    assert_close(
        "argmax rule",
        out.pooled.as_ref().unwrap(),
        &e["pooled_argmax_rule"],
        TOL,
    );
    // Any other eos_token_id: its first occurrence (0 when absent).
    let single = Teacher::load(&fixture("sdxl_single.safetensors"), &Device::Cpu).unwrap();
    let out = single.clip_g().forward(&rows).unwrap();
    assert_eq!(out.pooled_positions, vec![0, 10, 20]);
    assert_close(
        "first-eos rule (single file)",
        out.pooled.as_ref().unwrap(),
        &e["pooled_first_eos_rule"],
        TOL,
    );
    let dir = scratch("teacher-eos255");
    copy_dir(&fixture("diffusers"), &dir);
    edit_json(&dir.join("text_encoder_2/config.json"), |v| {
        v["eos_token_id"] = 255.into()
    });
    let t = Teacher::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(t.clip_g().pooling(), Pooling::FirstToken(255));
    let out = t.clip_g().forward(&rows).unwrap();
    assert_close(
        "first-eos rule (config eos 255)",
        out.pooled.as_ref().unwrap(),
        &e["pooled_first_eos_rule"],
        TOL,
    );
}

#[test]
fn both_layouts_share_a_fingerprint_that_follows_the_weights() {
    let a = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    let b = Teacher::load(&fixture("sdxl_single.safetensors"), &Device::Cpu).unwrap();
    assert!(a.fingerprint().starts_with("sha256:"));
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "f32 folder vs f16 single file"
    );
    // Same again: deterministic.
    let a2 = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    assert_eq!(a.fingerprint(), a2.fingerprint());
    // One changed CLIP-G weight changes it.
    let dir = scratch("teacher-fingerprint");
    copy_dir(&fixture("diffusers"), &dir);
    edit_safetensors(&dir.join("text_encoder_2/model.safetensors"), |t| {
        let k = "text_model.encoder.layers.1.mlp.fc2.bias";
        t.insert(k.into(), (&t[k] + 0.5).unwrap());
    });
    let c = Teacher::load(&dir, &Device::Cpu).unwrap();
    assert_ne!(a.fingerprint(), c.fingerprint());
    // So does the compute dtype.
    let d = Teacher::load_with_dtype(&fixture("diffusers"), &Device::Cpu, DType::BF16).unwrap();
    assert_ne!(a.fingerprint(), d.fingerprint());
}

#[test]
fn clip_tokenizer_gives_sdxl_ids() {
    let t = ClipTokenizer::embedded().unwrap();
    let cat = t
        .encode_sdxl("a photo of a cat", Padding::EndToken)
        .unwrap();
    assert_eq!(&cat.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(cat.ids.len(), SEQ_LEN);
    assert!(
        cat.ids[7..].iter().all(|&i| i == 49407),
        "CLIP-L pads with 49407"
    );
    let g = t.encode_sdxl("a photo of a cat", Padding::Id(0)).unwrap();
    assert_eq!(&g.ids[..7], &cat.ids[..7]);
    assert!(g.ids[7..].iter().all(|&i| i == 0), "CLIP-G pads with 0");
    let empty = t.encode_sdxl("", Padding::EndToken).unwrap();
    assert_eq!(&empty.ids[..2], &[49406, 49407]);
    assert_eq!(empty.dropped, 0);
    // 80 words of one token each: 75 kept, 5 dropped, the end token still last.
    let long = vec!["cat"; 80].join(" ");
    let l = t.encode_sdxl(&long, Padding::EndToken).unwrap();
    assert_eq!(l.dropped, 5);
    assert_eq!(l.ids[SEQ_LEN - 1], 49407);
    assert_eq!(l.ids[SEQ_LEN - 2], 2368);
    let exact = vec!["cat"; MAX_PROMPT_TOKENS].join(" ");
    assert_eq!(t.encode_sdxl(&exact, Padding::Id(0)).unwrap().dropped, 0);
}

/// Ids and truncation counts from `CLIPTokenizerFast` with diffusers' `tokenizer` settings
/// (pad `<|endoftext|>`, `max_length=77, truncation=True`); CLIP-G: the same tokens padded
/// with 0 (open_clip, which SDXL was trained with, and ComfyUI).
#[test]
fn clip_tokenizer_matches_transformers_with_sdxl_padding() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer_cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 7);
    let t = ClipTokenizer::embedded().unwrap();
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut quirks = 0;
    for c in &cases {
        let prompt = c["prompt"].as_str().unwrap();
        let l = t.encode_sdxl(prompt, Padding::EndToken).unwrap();
        let g = t.encode_sdxl(prompt, Padding::Id(0)).unwrap();
        assert_eq!(l.ids, as_ids(&c["ids_l"]), "CLIP-L ids of {prompt:?}");
        assert_eq!(g.ids, as_ids(&c["ids_g"]), "CLIP-G ids of {prompt:?}");
        assert_eq!(
            l.dropped as u64,
            c["dropped"].as_u64().unwrap(),
            "{prompt:?}"
        );
        // diffusers' tokenizer_2 (pad_token "!") splits every "!" out as id 0; we do not.
        if g.ids != as_ids(&c["ids_g_diffusers"]) {
            assert!(prompt.contains('!'), "{prompt:?}");
            quirks += 1;
        }
    }
    assert_eq!(quirks, 2);
}

fn tiny_teacher() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let d = scratch(&format!("tiny-teacher-{}", std::process::id()));
        qwenclip::dev::tiny::write_tiny_teacher(&d, 0).unwrap();
        d
    })
    .clone()
}

#[test]
fn tiny_teacher_encodes_a_batch_with_sdxl_shapes() {
    let t = Teacher::load(&tiny_teacher(), &Device::Cpu).unwrap();
    assert_eq!(t.output_dims(), (64, 16));
    assert!(t.notes().is_empty(), "{:?}", t.notes());
    let (tl, tg) = t.tokenizers();
    assert!(tl.path().unwrap().ends_with("tokenizer/tokenizer.json"));
    assert!(tg.path().unwrap().ends_with("tokenizer_2/tokenizer.json"));
    let long = vec!["red cube"; 50].join(" ");
    let prompts = ["a photo of a cat", "", long.as_str()];
    let out = t.encode(&prompts).unwrap();
    assert_eq!(out.prompt_embeds.dims(), &[3, 77, 64]);
    assert_eq!(out.pooled.dims(), &[3, 16]);
    assert_eq!(out.prompt_embeds.dtype(), DType::F32);
    assert_eq!(out.dropped_tokens, vec![0, 0, 25]);
    let finite = |x: &Tensor| {
        x.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    };
    assert!(finite(&out.prompt_embeds) && finite(&out.pooled));
    // The empty caption alone gives the same as inside the batch.
    let alone = t.encode(&[""]).unwrap();
    assert_close(
        "empty prompt alone vs in batch",
        &alone.prompt_embeds.get(0).unwrap(),
        &out.prompt_embeds.get(1).unwrap(),
        1e-5,
    );
    assert_close(
        "empty pooled alone vs in batch",
        &alone.pooled.get(0).unwrap(),
        &out.pooled.get(1).unwrap(),
        1e-5,
    );
    // Pooled at the end token: position 6 for the cat prompt, 1 for the empty one.
    let tok = t.tokenize(&prompts).unwrap();
    assert_eq!(tok.ids_g[0][7], 0);
    assert_eq!(tok.ids_l[0][7], 49407);
    let ids_g = Tensor::from_vec(tok.ids_g.concat(), (3, 77), &Device::Cpu).unwrap();
    let g = t.clip_g().forward(&ids_g).unwrap();
    assert_eq!(g.pooled_positions, vec![6, 1, 76]);
    assert!(t.encode(&[]).is_err());
}

#[test]
fn folder_without_tokenizer_json_falls_back_to_the_embedded_tokenizer() {
    let t = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    assert!(t.tokenizers().0.path().is_none());
    assert!(
        t.notes()
            .iter()
            .any(|n| n.contains("no tokenizer/ folder") && n.contains("embedded")),
        "{:?}",
        t.notes()
    );
    assert!(t.describe().contains("embedded CLIP tokenizer"));
    // diffusers ships vocab.json + merges.txt: said so, not an error.
    let dir = scratch("teacher-vocab-only");
    copy_dir(&tiny_teacher(), &dir);
    std::fs::remove_file(dir.join("tokenizer_2/tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_2/vocab.json"), "{}").unwrap();
    std::fs::write(dir.join("tokenizer_2/merges.txt"), "").unwrap();
    let t = Teacher::load(&dir, &Device::Cpu).unwrap();
    assert!(t.tokenizers().0.path().is_some());
    assert!(t.tokenizers().1.path().is_none());
    assert!(
        t.notes().iter().any(|n| n.contains("vocab.json")),
        "{:?}",
        t.notes()
    );
    assert_eq!(t.encode(&["a cat"]).unwrap().pooled.dims(), &[1, 16]);
}

#[test]
fn cli_teacher_writes_conditioning_and_warns_on_truncation() {
    let out_dir = scratch("teacher-cli");
    let out = out_dir.join("cond.safetensors");
    let long = vec!["cat"; 80].join(" ");
    let res = Command::new(env!("CARGO_BIN_EXE_qwenclip"))
        .args(["teacher", "--teacher"])
        .arg(tiny_teacher())
        .args([
            "--prompt",
            "a photo of a cat",
            "--prompt",
            "",
            "--prompt",
            &long,
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("prompt 2") && stderr.contains("5 were dropped"),
        "{stderr}"
    );
    let t = load(&out);
    assert_eq!(t["prompt_embeds"].dims(), &[3, 77, 64]);
    assert_eq!(t["pooled_prompt_embeds"].dims(), &[3, 16]);
    assert_eq!(t["prompt_embeds"].dtype(), DType::F32);
    let meta = qwenclip::formats::safetensors::read_metadata(&out).unwrap();
    let teacher = Teacher::load(&tiny_teacher(), &Device::Cpu).unwrap();
    assert_eq!(meta["qwenclip.teacher"], teacher.fingerprint());
    // Same numbers as the library.
    let lib = teacher.encode(&["a photo of a cat", "", &long]).unwrap();
    assert_close(
        "cli vs library",
        &t["prompt_embeds"],
        &lib.prompt_embeds,
        0.0,
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input: every error names the file (and the tensor or field).

#[test]
fn missing_text_encoder_2_is_named() {
    let dir = scratch("teacher-no-g");
    copy_dir(&fixture("diffusers"), &dir);
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(
        msg.contains("text_encoder_2") && msg.contains(&dir.display().to_string()),
        "{msg}"
    );
    // A folder with text_encoder_2/ but no weights in it.
    let dir = scratch("teacher-g-empty");
    copy_dir(&fixture("diffusers"), &dir);
    std::fs::remove_file(dir.join("text_encoder_2/model.safetensors")).unwrap();
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(
        msg.contains("text_encoder_2") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn single_file_without_conditioner_keys_is_rejected() {
    // A bare CLIP text encoder file is not an SDXL checkpoint.
    let file = fixture("diffusers/text_encoder/model.safetensors");
    let msg = err_text(Teacher::load(&file, &Device::Cpu));
    assert!(
        msg.contains(&file.display().to_string())
            && msg.contains("conditioner.embedders.0.transformer")
            && msg.contains("diffusers folder"),
        "{msg}"
    );
    // Only CLIP-L present.
    let dir = scratch("teacher-single-no-g");
    let path = dir.join("only_l.safetensors");
    std::fs::copy(fixture("sdxl_single.safetensors"), &path).unwrap();
    edit_safetensors(&path, |t| {
        t.retain(|k, _| !k.starts_with("conditioner.embedders.1."))
    });
    let msg = err_text(Teacher::load(&path, &Device::Cpu));
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("conditioner.embedders.1.model"),
        "{msg}"
    );
    // Not a safetensors file at all.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let msg = err_text(Teacher::load(&junk, &Device::Cpu));
    assert!(msg.contains("junk.safetensors"), "{msg}");
    let msg = err_text(Teacher::load(&dir.join("nope"), &Device::Cpu));
    assert!(msg.contains("nope") && msg.contains("not found"), "{msg}");
}

#[test]
fn wrong_shapes_name_the_file_and_tensor() {
    // Config and weights disagree (diffusers).
    let dir = scratch("teacher-bad-shape");
    copy_dir(&fixture("diffusers"), &dir);
    edit_json(&dir.join("text_encoder/config.json"), |v| {
        v["intermediate_size"] = 100.into()
    });
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(
        msg.contains("text_encoder/model.safetensors")
            && msg.contains("text_model.encoder.layers.0.mlp.fc1.weight")
            && msg.contains("[100, 64]")
            && msg.contains("[128, 64]"),
        "{msg}"
    );
    // A fused open_clip in_proj of the wrong height (single file).
    let path = dir.join("bad_single.safetensors");
    std::fs::copy(fixture("sdxl_single.safetensors"), &path).unwrap();
    let key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight";
    edit_safetensors(&path, |t| {
        let w = t[key].narrow(0, 0, 256).unwrap();
        t.insert(key.into(), w);
    });
    let msg = err_text(Teacher::load(&path, &Device::Cpu));
    assert!(
        msg.contains("bad_single.safetensors") && msg.contains(key) && msg.contains("[384, 128]"),
        "{msg}"
    );
    // A projection of the wrong orientation is caught as well.
    let path2 = dir.join("bad_proj.safetensors");
    std::fs::copy(fixture("sdxl_single.safetensors"), &path2).unwrap();
    let key = "conditioner.embedders.1.model.text_projection";
    edit_safetensors(&path2, |t| {
        let w = t[key].t().unwrap().contiguous().unwrap();
        t.insert(key.into(), w);
    });
    let msg = err_text(Teacher::load(&path2, &Device::Cpu));
    assert!(
        msg.contains("bad_proj.safetensors") && msg.contains(key) && msg.contains("[128, P]"),
        "{msg}"
    );
}

#[test]
fn bad_configs_name_the_file_and_field() {
    let dir = scratch("teacher-bad-config");
    copy_dir(&fixture("diffusers"), &dir);
    let cfg = dir.join("text_encoder_2/config.json");
    edit_json(&cfg, |v| v["hidden_act"] = "relu".into());
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(
        msg.contains("text_encoder_2/config.json") && msg.contains("hidden_act"),
        "{msg}"
    );
    edit_json(&cfg, |v| {
        v["hidden_act"] = "gelu".into();
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(
        msg.contains("text_encoder_2/config.json") && msg.contains("hidden_size"),
        "{msg}"
    );
    std::fs::write(&cfg, "{not json").unwrap();
    let msg = err_text(Teacher::load(&dir, &Device::Cpu));
    assert!(msg.contains("text_encoder_2/config.json"), "{msg}");
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error() {
    // The fixture models have 256 tokens; the real CLIP tokenizer does not belong to them.
    let t = Teacher::load(&fixture("diffusers"), &Device::Cpu).unwrap();
    let msg = err_text(t.encode(&["a photo of a cat"]));
    assert!(
        msg.contains("vocabulary") && msg.contains("text_encoder/model.safetensors"),
        "{msg}"
    );
}
