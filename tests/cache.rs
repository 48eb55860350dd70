//! Target cache: build, read back, f16, resume after a kill, mismatches, corruption, split.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qwenclip::data::{
    build_cache, caption_hash, CacheOptions, CacheProgress, CaptionSet, TargetCache, TargetSource,
    MANIFEST_FILE,
};
use qwenclip::rng::Rng;

const S: usize = 77;
const D: usize = 8;
const P: usize = 4;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-scratch")
        .join(format!("cache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fake teacher: outputs seeded by the caption's hash, so every caption always gets the
/// same targets whatever batch it is in. Counts the captions it encodes; fails once it has
/// encoded `fail_after` captions (a simulated kill).
struct Fake {
    name: &'static str,
    calls: Cell<usize>,
    encoded: Cell<usize>,
    fail_after: Option<usize>,
}

impl Fake {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            calls: Cell::new(0),
            encoded: Cell::new(0),
            fail_after: None,
        }
    }

    fn failing(after: usize) -> Self {
        Self {
            fail_after: Some(after),
            ..Self::new("teacher-a")
        }
    }

    fn targets(&self, caption: &str) -> (Vec<f32>, Vec<f32>) {
        let h = caption_hash(&format!("{}|{caption}", self.name));
        let seed = u64::from_str_radix(&h[..16], 16).unwrap();
        let mut rng = Rng::new(seed);
        (rng.normal_vec(S * D, 1.0), rng.normal_vec(P, 1.0))
    }
}

impl TargetSource for Fake {
    fn fingerprint(&self) -> String {
        format!("fake:{}", self.name)
    }
    fn describe(&self) -> String {
        format!("fake teacher {}", self.name)
    }
    fn encode(&self, captions: &[&str]) -> qwenclip::Result<(Tensor, Tensor, Vec<usize>)> {
        if let Some(k) = self.fail_after {
            if self.encoded.get() + captions.len() > k {
                return Err(qwenclip::Error::Invalid("simulated kill".into()));
            }
        }
        self.calls.set(self.calls.get() + 1);
        self.encoded.set(self.encoded.get() + captions.len());
        let (mut e, mut p) = (Vec::new(), Vec::new());
        for c in captions {
            let (a, b) = self.targets(c);
            e.extend(a);
            p.extend(b);
        }
        let n = captions.len();
        let dropped = captions
            .iter()
            .map(|c| usize::from(c.contains("long")))
            .collect();
        Ok((
            Tensor::from_vec(e, (n, S, D), &Device::Cpu)?,
            Tensor::from_vec(p, (n, P), &Device::Cpu)?,
            dropped,
        ))
    }
}

fn captions(n: usize) -> CaptionSet {
    let caps: Vec<String> = (0..n)
        .map(|i| {
            if i % 7 == 3 {
                format!("a long caption number {i}")
            } else {
                format!("caption number {i}")
            }
        })
        .collect();
    CaptionSet::from_captions(caps, "mem").unwrap()
}

fn opts(shard_size: usize, batch_size: usize) -> CacheOptions {
    CacheOptions {
        shard_size,
        batch_size,
        ..Default::default()
    }
}

fn quiet() -> impl FnMut(&CacheProgress) {
    |_: &CacheProgress| {}
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Reads every caption back in a shuffled order, compares with the source.
fn check_contents(cache: &TargetCache, src: &Fake, tol: f32) {
    let n = cache.len();
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(5).shuffle(&mut order);
    for chunk in order.chunks(5) {
        let (e, p) = cache.get_batch(chunk, &Device::Cpu).unwrap();
        assert_eq!(e.dims(), &[chunk.len(), S, D]);
        assert_eq!(p.dims(), &[chunk.len(), P]);
        for (row, &i) in chunk.iter().enumerate() {
            let (we, wp) = src.targets(&cache.captions()[i]);
            let ge = e
                .get(row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let gp = p.get(row).unwrap().to_vec1::<f32>().unwrap();
            assert!(max_abs_diff(&ge, &we) <= tol, "caption {i}: embeds differ");
            assert!(max_abs_diff(&gp, &wp) <= tol, "caption {i}: pooled differ");
        }
    }
}

fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn build_open_and_read_back() {
    let d = scratch("build");
    let caps = captions(23);
    let src = Fake::new("teacher-a");
    let mut seen: Vec<CacheProgress> = Vec::new();
    let mut record = |p: &CacheProgress| seen.push(*p);
    let built = build_cache(&src, &caps, &d, &opts(10, 4), &mut record).unwrap();
    assert_eq!(built.len(), 23);
    assert_eq!(src.encoded.get(), 23);
    // Batches never straddle shards: 10 = 4+4+2, 10 = 4+4+2, 3.
    assert_eq!(src.calls.get(), 7);
    assert_eq!(seen.first().unwrap().done, 0);
    assert_eq!(seen.last().unwrap().done, 23);
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    assert!(seen.iter().all(|p| p.total == 23));

    let names: Vec<String> = shard_bytes(&d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "shard-00002.safetensors"
        ]
    );
    let cache = TargetCache::open(&d).unwrap();
    let m = cache.manifest();
    assert_eq!(m.format, "qwenclip-target-cache");
    assert_eq!(m.version, 1);
    assert_eq!(m.count, 23);
    assert_eq!(m.dtype, "f32");
    assert_eq!((m.dims.seq, m.dims.embed, m.dims.pooled), (S, D, P));
    assert_eq!(m.teacher_fingerprint, "fake:teacher-a");
    assert_eq!(m.teacher, "fake teacher teacher-a");
    assert_eq!(m.captions_fingerprint, caps.fingerprint());
    assert_eq!(m.caption_hashes, caps.hashes());
    assert_eq!(m.truncated, (0..23).filter(|i| i % 7 == 3).count());
    assert_eq!(
        m.shards
            .iter()
            .map(|s| (s.start, s.count))
            .collect::<Vec<_>>(),
        vec![(0, 10), (10, 10), (20, 3)]
    );
    assert_eq!(cache.captions(), caps.captions.as_slice());
    check_contents(&cache, &src, 0.0);
    check_contents(&built, &src, 0.0);
    // Repeated indices and bad indices.
    let (e, _) = cache.get_batch(&[3, 3, 22], &Device::Cpu).unwrap();
    assert_eq!(e.dims(), &[3, S, D]);
    let msg = cache
        .get_batch(&[23], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("23") && msg.contains("out of range"), "{msg}");

    // The shard files are plain safetensors with the documented tensors.
    let t =
        candle_core::safetensors::load(d.join("shard-00001.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["prompt_embeds"].dims(), &[10, S, D]);
    assert_eq!(t["pooled"].dims(), &[10, P]);
    assert_eq!(
        t["index"].to_vec1::<u32>().unwrap(),
        (10..20).collect::<Vec<u32>>()
    );

    // Rebuilding a finished cache computes nothing.
    let again = Fake::new("teacher-a");
    build_cache(&again, &caps, &d, &opts(10, 4), &mut quiet()).unwrap();
    assert_eq!(again.encoded.get(), 0);
}

#[test]
fn f16_round_trip() {
    let d = scratch("f16");
    let caps = captions(9);
    let src = Fake::new("teacher-a");
    let o = CacheOptions {
        f16: true,
        ..opts(4, 3)
    };
    build_cache(&src, &caps, &d, &o, &mut quiet()).unwrap();
    let cache = TargetCache::open(&d).unwrap();
    assert_eq!(cache.manifest().dtype, "f16");
    let t =
        candle_core::safetensors::load(d.join("shard-00000.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["prompt_embeds"].dtype(), candle_core::DType::F16);
    let (e, _) = cache.get_batch(&[0], &Device::Cpu).unwrap();
    assert_eq!(e.dtype(), candle_core::DType::F32);
    // Values are ~N(0,1), |x| < 6: f16 has an 11-bit mantissa, error <= 6 * 2^-11.
    check_contents(&cache, &src, 6.0 / 2048.0);
    // An f32 cache in the same folder is refused unless overwriting.
    let msg = build_cache(&src, &caps, &d, &opts(4, 3), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("f16") && msg.contains("--overwrite"), "{msg}");
}

#[test]
fn resume_after_kill_matches_uninterrupted_build() {
    let caps = captions(25);
    let o = opts(6, 4);

    let whole = scratch("resume-whole");
    build_cache(&Fake::new("teacher-a"), &caps, &whole, &o, &mut quiet()).unwrap();

    let d = scratch("resume");
    // Dies in shard 2 (captions 12..18) after 14 captions: shards 0 and 1 are finished.
    let dying = Fake::failing(14);
    let msg = build_cache(&dying, &caps, &d, &o, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("simulated kill"), "{msg}");
    // What is left is a valid, incomplete cache.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(m["shards"].as_array().unwrap().len(), 2);
    let msg = TargetCache::open(&d).unwrap_err().to_string();
    assert!(
        msg.contains("incomplete") && msg.contains("cache-targets"),
        "{msg}"
    );
    // A stale temporary file from the killed write is cleaned up.
    std::fs::write(d.join(".shard-00002.safetensors.tmp999"), b"partial").unwrap();

    let good = Fake::new("teacher-a");
    let mut first: Option<CacheProgress> = None;
    let mut record = |p: &CacheProgress| {
        first.get_or_insert(*p);
    };
    let cache = build_cache(&good, &caps, &d, &o, &mut record).unwrap();
    assert_eq!(good.encoded.get(), 25 - 12, "only shards 2..5 are computed");
    let first = first.unwrap();
    assert_eq!((first.done, first.resumed), (12, 12));
    assert_eq!(
        shard_bytes(&d),
        shard_bytes(&whole),
        "byte-identical shards"
    );
    assert_eq!(
        std::fs::read(d.join(MANIFEST_FILE)).unwrap(),
        std::fs::read(whole.join(MANIFEST_FILE)).unwrap()
    );
    assert!(!d.join(".shard-00002.safetensors.tmp999").exists());
    check_contents(&cache, &good, 0.0);

    // A corrupt finished shard is recomputed on resume (and only that one).
    let shard = d.join("shard-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let fixer = Fake::new("teacher-a");
    build_cache(&fixer, &caps, &d, &o, &mut quiet()).unwrap();
    assert_eq!(fixer.encoded.get(), 6);
    assert!(
        shard_bytes(&d) == shard_bytes(&whole),
        "repaired shard differs"
    );
}

#[test]
fn other_teacher_or_captions_are_refused_with_reasons() {
    let d = scratch("mismatch");
    let caps = captions(12);
    build_cache(
        &Fake::new("teacher-a"),
        &caps,
        &d,
        &opts(5, 5),
        &mut quiet(),
    )
    .unwrap();
    let cache = TargetCache::open(&d).unwrap();

    // check_against: teacher.
    cache
        .check_against(Some("fake:teacher-a"), Some(&caps))
        .unwrap();
    cache.check_against(None, None).unwrap();
    let msg = cache
        .check_against(Some("fake:teacher-b"), None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("another teacher") && msg.contains("fake:teacher-b"),
        "{msg}"
    );
    assert!(msg.contains(MANIFEST_FILE), "{msg}");

    // check_against: an edited caption.
    let mut edited = caps.captions.clone();
    edited[4] = "an edited caption".into();
    let edited = CaptionSet::from_captions(edited, "edited.txt").unwrap();
    let msg = cache
        .check_against(None, Some(&edited))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("caption 5 changed") && !msg.contains("added"),
        "{msg}"
    );
    assert!(
        msg.contains("caption number 4") && msg.contains("an edited caption"),
        "{msg}"
    );

    // Two edits and a swap.
    let mut shuffled = caps.captions.clone();
    shuffled.swap(0, 1);
    shuffled[7] = "edit one".into();
    shuffled[9] = "edit two".into();
    let shuffled = CaptionSet::from_captions(shuffled, "s.txt").unwrap();
    let msg = cache
        .check_against(None, Some(&shuffled))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("caption 1 changed") && msg.contains("4 captions differ"),
        "{msg}"
    );
    assert!(
        msg.contains("2 captions added") && msg.contains("2 captions removed"),
        "{msg}"
    );

    // check_against: captions added / removed.
    let mut more = caps.captions.clone();
    more.extend(["x".to_string(), "y".into(), "z".into()]);
    let more = CaptionSet::from_captions(more, "more.txt").unwrap();
    let msg = cache
        .check_against(None, Some(&more))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("3 captions added") && !msg.contains("changed"),
        "{msg}"
    );
    let fewer = CaptionSet::from_captions(&caps.captions[..10], "fewer.txt").unwrap();
    let msg = cache
        .check_against(None, Some(&fewer))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2 captions removed"), "{msg}");

    // build_cache into the same folder: refused with the reason, unless overwriting.
    let other = Fake::new("teacher-b");
    let msg = build_cache(&other, &caps, &d, &opts(5, 5), &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("another teacher") && msg.contains("--overwrite"),
        "{msg}"
    );
    assert_eq!(other.encoded.get(), 0);
    let msg = build_cache(
        &Fake::new("teacher-a"),
        &edited,
        &d,
        &opts(5, 5),
        &mut quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("other captions") && msg.contains("caption 5 changed"),
        "{msg}"
    );
    let msg = build_cache(
        &Fake::new("teacher-a"),
        &caps,
        &d,
        &opts(4, 5),
        &mut quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("shard size is 5"), "{msg}");

    // Overwrite: a fresh cache with the new teacher, no stale shards left behind.
    let o = CacheOptions {
        overwrite: true,
        ..opts(5, 5)
    };
    let rebuilt = build_cache(&other, &fewer, &d, &o, &mut quiet()).unwrap();
    assert_eq!(other.encoded.get(), 10);
    assert_eq!(rebuilt.manifest().teacher_fingerprint, "fake:teacher-b");
    assert_eq!(shard_bytes(&d).len(), 2);
    check_contents(&TargetCache::open(&d).unwrap(), &other, 0.0);
}

#[test]
fn foreign_folder_is_refused() {
    let d = scratch("foreign");
    std::fs::write(d.join("img001.png"), b"not ours").unwrap();
    let msg = build_cache(
        &Fake::new("teacher-a"),
        &captions(3),
        &d,
        &opts(2, 2),
        &mut quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("not a target cache") && msg.contains("img001.png"),
        "{msg}"
    );
    let msg = TargetCache::open(&d).unwrap_err().to_string();
    assert!(msg.contains("no manifest.json"), "{msg}");
}

#[test]
fn corrupt_or_missing_shard_is_refused_on_open() {
    let d = scratch("corrupt");
    let caps = captions(10);
    let src = Fake::new("teacher-a");
    build_cache(&src, &caps, &d, &opts(4, 4), &mut quiet()).unwrap();
    let shard = d.join("shard-00001.safetensors");
    let orig = std::fs::read(&shard).unwrap();

    let mut bytes = orig.clone();
    let n = bytes.len();
    bytes[n / 2 + 100] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let msg = TargetCache::open(&d).unwrap_err().to_string();
    assert!(
        msg.contains("shard-00001.safetensors")
            && msg.contains("corrupt")
            && msg.contains("cache-targets"),
        "{msg}"
    );
    // Unverified opening skips the hash (same size); `verify` finds it.
    let unverified = TargetCache::open_unverified(&d).unwrap();
    assert!(unverified.verify().is_err());

    // Truncated: caught even without hashing.
    std::fs::write(&shard, &orig[..orig.len() - 10]).unwrap();
    let msg = TargetCache::open_unverified(&d).unwrap_err().to_string();
    assert!(
        msg.contains("shard-00001.safetensors") && msg.contains("corrupt"),
        "{msg}"
    );

    std::fs::remove_file(&shard).unwrap();
    let msg = TargetCache::open_unverified(&d).unwrap_err().to_string();
    assert!(
        msg.contains("shard-00001.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    // Rerunning the build repairs it.
    let fixer = Fake::new("teacher-a");
    build_cache(&fixer, &caps, &d, &opts(4, 4), &mut quiet()).unwrap();
    assert_eq!(fixer.encoded.get(), 4);
    assert!(
        std::fs::read(&shard).unwrap() == orig,
        "rebuilt shard differs"
    );
    check_contents(&TargetCache::open(&d).unwrap(), &src, 0.0);

    // An edited manifest is refused.
    let mpath = d.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(
        &mpath,
        text.replace("caption number 2", "caption number two"),
    )
    .unwrap();
    let msg = TargetCache::open_unverified(&d).unwrap_err().to_string();
    assert!(
        msg.contains(MANIFEST_FILE) && msg.contains("caption 3"),
        "{msg}"
    );
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let d = scratch("split");
    build_cache(
        &Fake::new("teacher-a"),
        &captions(50),
        &d,
        &opts(16, 8),
        &mut quiet(),
    )
    .unwrap();
    let cache = TargetCache::open(&d).unwrap();
    let (train, held) = cache.split(0.1, 7);
    assert_eq!(held.len(), 5);
    assert_eq!(train.len(), 45);
    let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
    assert_eq!(cache.split(0.1, 7), (train.clone(), held.clone()));
    assert_ne!(cache.split(0.1, 8).1, held, "another seed, another split");
    // Tiny fractions still hold one out; none when asked for none.
    assert_eq!(cache.split(0.001, 1).1.len(), 1);
    assert_eq!(cache.split(0.0, 1).1.len(), 0);
    assert_eq!(cache.split(1.0, 1).0.len(), 1);
    assert_eq!(qwenclip::data::split_indices(2, 0.01, 3).1.len(), 1);
    assert_eq!(qwenclip::data::split_indices(1, 0.5, 3), (vec![0], vec![]));
}

#[test]
fn target_cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TargetCache>();
}
