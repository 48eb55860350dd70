//! Killed runs lose nothing: `qwenclip cache-targets` and `qwenclip train` are SIGKILLed at
//! seeded random moments (and, every other time, the moment a file write is under way),
//! resumed after each kill, and end bit for bit where an uninterrupted run ends, with no
//! temporary file left behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qwenclip::formats::atomic::temp_target;
use qwenclip::rng::Rng;

const KILLS: usize = 10;

fn qwenclip(args: &[&str], paths: &[(&str, &Path)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qwenclip"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run_to_end(mut cmd: Command) -> Duration {
    let t0 = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

/// Every file under `dir` (relative path -> bytes).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn temp_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|r| r.flatten())
        .map(|e| e.path())
        .filter(|p| temp_target(&p.file_name().unwrap().to_string_lossy()).is_some())
        .collect()
}

enum When {
    After(Duration),
    /// As soon as a temporary file shows in one of the folders (a write under way).
    InWrite,
}

/// Starts `cmd` and SIGKILLs it at `when`; `None` when it finished first, else whether the
/// kill left a temporary file.
fn kill(mut cmd: Command, when: &When, watch: &[PathBuf], limit: Duration) -> Option<bool> {
    let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{cmd:?} failed on its own: {status}");
            return None;
        }
        let now = match when {
            When::After(d) => t0.elapsed() >= *d,
            When::InWrite => !temp_files(watch).is_empty() || t0.elapsed() >= limit,
        };
        if now {
            child.kill().unwrap();
            child.wait().unwrap();
            return Some(!temp_files(watch).is_empty());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

struct Tally {
    kills: usize,
    mid_write: usize,
    rounds: usize,
}

/// A command killed and resumed into `out`.
struct Scenario<'a> {
    seed: u64,
    out: &'a Path,
    /// Folders where the command's temporary files would show.
    watch: &'a [PathBuf],
    /// The command when nothing is resumable yet, and the one that resumes.
    start: &'a dyn Fn() -> Command,
    resume: &'a dyn Fn() -> Command,
    resumable: &'a dyn Fn() -> bool,
    /// How long an uninterrupted run takes (kills fall inside it).
    full: Duration,
    /// What must come out bit for bit.
    result: &'a dyn Fn() -> BTreeMap<PathBuf, Vec<u8>>,
}

/// Rounds of: a fresh output folder, then the command killed and resumed at seeded moments
/// until one run finishes; each round must end with `want` and no temporary file. Stops once
/// `KILLS` kills landed.
fn killed_rounds(s: &Scenario, want: &BTreeMap<PathBuf, Vec<u8>>) -> Tally {
    let mut rng = Rng::new(s.seed);
    let mut t = Tally {
        kills: 0,
        mid_write: 0,
        rounds: 0,
    };
    while t.kills < KILLS {
        t.rounds += 1;
        let _ = std::fs::remove_dir_all(s.out);
        loop {
            let when = if t.kills.is_multiple_of(2) {
                When::After(s.full.mul_f64(rng.uniform()))
            } else {
                When::InWrite
            };
            let cmd = if (s.resumable)() {
                (s.resume)()
            } else {
                (s.start)()
            };
            if t.kills >= KILLS {
                run_to_end(cmd);
                break;
            }
            match kill(cmd, &when, s.watch, s.full * 2) {
                None => break,
                Some(left_temp) => {
                    t.kills += 1;
                    t.mid_write += left_temp as usize;
                }
            }
        }
        assert!(
            temp_files(s.watch).is_empty(),
            "temporary files left after round {}: {:?}",
            t.rounds,
            temp_files(s.watch)
        );
        let got = (s.result)();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "round {}: other files",
            t.rounds
        );
        for (name, bytes) in want {
            assert!(
                got[name] == *bytes,
                "round {} after {} kills: {} differs from the uninterrupted run's",
                t.rounds,
                t.kills,
                name.display()
            );
        }
    }
    t
}

const CAPTIONS: &str = "a red cube left of a blue sphere\na cat under a wooden table\n\
    a green car on a bridge\na house at night\ntwo dogs on a beach\nan old man with a beard\n\
    a castle on a hill\na bowl of fruit, no bananas\na bicycle against a brick wall\n\
    a lighthouse in a storm\na cup of coffee on a desk\na fox in the snow\n";

fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    dev_tiny(&dir);
    std::fs::write(dir.join("captions.txt"), CAPTIONS).unwrap();
    (dir.clone(), dir.join("captions.txt"))
}

fn cache_cmd(dir: &Path, captions: &Path, out: &Path) -> Command {
    qwenclip(
        &["cache-targets", "--shard-size", "2", "--batch-size", "1"],
        &[
            ("--teacher", &dir.join("teacher")),
            ("--captions", captions),
            ("--out", out),
        ],
    )
}

#[test]
fn cache_targets_killed_ten_times_ends_as_the_uninterrupted_build() {
    let (dir, captions) = setup("kills-cache");
    let reference = dir.join("cache-ref");
    let full = run_to_end(cache_cmd(&dir, &captions, &reference));
    let want = files(&reference);
    let out = dir.join("cache");
    let cmd = || cache_cmd(&dir, &captions, &out);
    let t = killed_rounds(
        &Scenario {
            seed: 1,
            out: &out,
            watch: std::slice::from_ref(&out),
            start: &cmd,
            resume: &cmd,
            resumable: &|| true,
            full,
            result: &|| files(&out),
        },
        &want,
    );
    eprintln!(
        "cache-targets: {} kills ({} during a write) over {} rounds; uninterrupted {full:?}",
        t.kills, t.mid_write, t.rounds
    );
}

fn train_cmd(dir: &Path, out: &Path, resume: bool) -> Command {
    let mut c = qwenclip(
        &[
            "train",
            "--steps",
            "16",
            "--batch-size",
            "2",
            "--save-every",
            "1",
            "--eval-every",
            "4",
            "--held-out",
            "0.2",
        ],
        &[
            ("--model", &dir.join("model")),
            ("--cache", &dir.join("cache")),
            ("--out", out),
        ],
    );
    if resume {
        c.arg("--resume").arg(out);
    }
    c
}

#[test]
fn train_killed_ten_times_resumes_to_the_uninterrupted_adapter() {
    let (dir, captions) = setup("kills-train");
    run_to_end(cache_cmd(&dir, &captions, &dir.join("cache")));
    let reference = dir.join("run-ref");
    let full = run_to_end(train_cmd(&dir, &reference, false));
    let result = |run: &Path| {
        let mut f = files(&run.join("adapter"));
        f.insert(
            "checkpoint.safetensors".into(),
            std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        );
        f
    };
    let want = result(&reference);
    let out = dir.join("run");
    let watch = [out.clone(), out.join("adapter")];
    let t = killed_rounds(
        &Scenario {
            seed: 2,
            out: &out,
            watch: &watch,
            start: &|| train_cmd(&dir, &out, false),
            resume: &|| train_cmd(&dir, &out, true),
            resumable: &|| out.join("checkpoint.safetensors").is_file(),
            full,
            result: &|| result(&out),
        },
        &want,
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("metrics.jsonl holds a torn line {line:?}: {e}"));
    }
    eprintln!(
        "train: {} kills ({} during a write) over {} rounds; uninterrupted {full:?}",
        t.kills, t.mid_write, t.rounds
    );
}
