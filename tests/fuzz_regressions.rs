//! The fuzz targets on stable (no nightly, no libFuzzer): every input that ever crashed one
//! (`fuzz/regressions/<target>/`) must now get an answer, an error or a success, without a
//! panic; and the seed inputs (valid files) must load. With `QWENCLIP_FUZZ_SEEDS=DIR` the
//! seeds are also written to `DIR/<target>/` to start the fuzz corpora (docs/reliability.md).
//!
//! As under the fuzzer's `-malloc_limit_mb`, a single allocation over 1 GiB is a failure
//! (`qwenclip::allocator::refuse_above`, so these tests need the default `allocator` feature):
//! a size taken from a header without a bound aborts the test binary instead of passing on
//! lazily zeroed pages.
#![cfg(feature = "allocator")]

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};

/// The tiny inputs here never need one allocation this large.
const CAP: usize = 1 << 30;

#[test]
fn every_input_that_crashed_a_target_is_now_answered() {
    qwenclip::allocator::refuse_above(CAP);
    let root = harness::repo_root().join("fuzz/regressions");
    let mut replayed = 0;
    for (name, target) in harness::TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| target(&bytes)));
            assert!(outcome.is_ok(), "{} panics", e.path().display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no regression inputs under {}",
        root.display()
    );
}

#[test]
fn the_seed_inputs_load() {
    qwenclip::allocator::refuse_above(CAP);
    let out = std::env::var_os("QWENCLIP_FUZZ_SEEDS").map(std::path::PathBuf::from);
    for (name, label, bytes) in harness::seeds() {
        let (_, target) = harness::TARGETS.iter().find(|(n, _)| *n == name).unwrap();
        if let Err(e) = target(&bytes) {
            panic!("seed {name}/{label} does not load: {e}");
        }
        if let Some(dir) = &out {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(label), &bytes).unwrap();
        }
    }
}
