//! The fuzz targets on stable (no nightly, no libFuzzer): every input that ever crashed one
//! (`fuzz/regressions/<target>/`) must now get an answer, an error or a success, without a
//! panic; and the seed inputs (valid files) must load. With `QWENCLIP_FUZZ_SEEDS=DIR` the
//! seeds are also written to `DIR/<target>/` to start the fuzz corpora (docs/reliability.md).
//!
//! As under the fuzzer's `-malloc_limit_mb`, a single allocation over 1 GiB is a failure (the
//! tiny inputs here never need one): a size taken from a header without a bound aborts the
//! test binary instead of passing on lazily zeroed pages.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};

struct Capped;

const CAP: usize = 1 << 30;

// SAFETY: forwards to the system allocator; a refused request returns null, which Rust
// reports as an allocation failure.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

#[test]
fn every_input_that_crashed_a_target_is_now_answered() {
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
