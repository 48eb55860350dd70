//! Every command in every README runs as written: the offline ones are run (the README's
//! first line, the tiny training block), and every other `qwenclip`, `qwenclip-dev` and
//! `plugin/install.py` command is checked to parse (its flags and values are accepted) without
//! running it, since it needs a real model, a network or hours. Scripts named must exist
//! (`examples/sdxl_diffusers.py` is run by tests/diffusers).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Markdown files whose shell blocks are checked.
const DOCS: [&str; 9] = [
    "README.md",
    "plugin/README.md",
    "python/README.md",
    "integrations/invokeai/README.md",
    "docs/gguf.md",
    "docs/adapter-format.md",
    "docs/c-api.md",
    "docs/reliability.md",
    "tests/fixtures/unet/README.md",
];

/// The commands of a file's shell blocks: continuation lines joined, comments dropped.
fn commands(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(doc)).unwrap();
    let mut out = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block && matches!(line.trim(), "```sh" | "```bash" | "```shell");
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let command = current.split(" # ").next().unwrap().trim().to_string();
        current.clear();
        if !command.is_empty() && !command.starts_with('#') {
            out.push(command);
        }
    }
    out
}

/// The simple commands of a command line (`a && (cd x && b)` -> `a`, `cd x`, `b`).
fn simple(command: &str) -> Vec<String> {
    command
        .split("&&")
        .map(|c| {
            c.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .trim()
                .to_string()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// A shell whose PATH finds this build's `qwenclip` and `qwenclip-dev` first, offline.
fn shell(command: &str, dir: &Path) -> std::process::Output {
    let bins: Vec<PathBuf> = [
        env!("CARGO_BIN_EXE_qwenclip"),
        env!("CARGO_BIN_EXE_qwenclip-dev"),
    ]
    .iter()
    .map(|b| Path::new(b).parent().unwrap().to_path_buf())
    .collect();
    let path = std::env::join_paths(bins.into_iter().chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .env("PATH", path)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("CARGO_MANIFEST_DIR")
        .output()
        .unwrap()
}

fn check_parses(doc: &str, command: &str) {
    let words: Vec<&str> = command.split_whitespace().collect();
    let program = words[0].trim_start_matches("./target/release/");
    match program {
        "qwenclip" | "qwenclip-dev" => {
            // Flags and values are parsed before `--help` is acted on: exit 0 means the
            // command line is one the program takes.
            let rest = command.split_once(' ').map(|x| x.1).unwrap_or("");
            let out = shell(&format!("{program} {rest} --help"), &root());
            assert!(
                out.status.success(),
                "{doc}: `{command}` is not a command line {program} takes:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        "python" | "python3" if words.get(1) == Some(&"plugin/install.py") => {
            let args = command.split_once("plugin/install.py").unwrap().1;
            let check = format!(
                "python3 -c 'import shlex, sys; sys.path.insert(0, \"plugin\"); import install; install.parser().parse_args(shlex.split(sys.argv[1]))' '{}'",
                args.trim()
            );
            let out = shell(&check, &root());
            assert!(
                out.status.success(),
                "{doc}: `{command}`: install.py does not take these arguments:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        "python" | "python3" if words.get(1).is_some_and(|w| w.ends_with(".py")) => {
            assert!(
                root().join(words[1]).is_file(),
                "{doc}: `{command}`: {} does not exist",
                words[1]
            );
        }
        p if p.ends_with(".sh") && p.contains('/') => {
            assert!(
                root().join(p).is_file(),
                "{doc}: `{command}`: {p} does not exist"
            );
        }
        "bash" => {
            let script = words[1];
            assert!(
                root().join(script).is_file(),
                "{doc}: `{command}`: {script} does not exist"
            );
        }
        // cargo, pip, python -m venv, printf, cd: the build and the environment, run by CI
        // or too expensive to run here.
        _ => {}
    }
}

#[test]
fn every_documented_command_is_one_the_tools_take() {
    let mut checked = 0;
    for doc in DOCS {
        for command in commands(doc) {
            for c in simple(&command) {
                check_parses(doc, &c);
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} commands found");
}

#[test]
fn the_readme_offline_blocks_run_as_written() {
    let readme = commands("README.md");
    // The first line installs with cargo, then runs the smoke run: the tests run what follows
    // the install with this build's binaries.
    let first = &readme[0];
    let (install, smoke) = first.split_once(" && ").unwrap();
    assert!(install.starts_with("cargo install"), "{first}");
    let _ = std::fs::remove_dir_all("/tmp/qc");
    let out = shell(smoke, &root());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cond = load(Path::new("/tmp/qc/cond.safetensors"));
    assert_eq!(cond["prompt_embeds"].dims(), &[2, 77, 2048]);
    assert!(
        !root().join("cond.safetensors").exists(),
        "the smoke run writes nothing into the source tree"
    );
    // The tiny training block, line by line.
    let _ = std::fs::remove_dir_all("/tmp/qc-train");
    for command in readme.iter().filter(|c| c.contains("/tmp/qc-train")) {
        let out = shell(command, &std::env::temp_dir());
        assert!(
            out.status.success(),
            "`{command}`:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(Path::new("/tmp/qc-train/run-vision/adapter/qwenclip.json").is_file());
}
