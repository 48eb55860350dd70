//! The target cache: the teacher's outputs for every caption of a caption set, computed once
//! (stage 1, `cache-targets`) and read by the trainer (stage 2).
//!
//! A cache is a folder:
//!
//! ```text
//! manifest.json            what was cached, with which teacher, for which captions
//! shard-00000.safetensors  prompt_embeds [n,S,D], pooled [n,P] (f32 or f16), index [n] u32
//! shard-00001.safetensors  ...
//! ```
//!
//! Shard `k` holds captions `k*shard_size .. min((k+1)*shard_size, count)`; `index` holds
//! those caption positions. Every shard is written atomically (temporary file + rename) and
//! the manifest is rewritten atomically after each one, listing only finished shards with
//! their sha256, so a build killed at any point leaves a valid cache that
//! [`build_cache`] resumes. The teacher is seen only through [`TargetSource`], so this module
//! does not depend on the teacher code.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::captions::{caption_hash, fingerprint_of_hashes, CaptionSet};
use crate::error::{read_json, Error, Result};
use crate::formats::safetensors::write_atomic;

/// `format` of every cache manifest.
pub const CACHE_FORMAT: &str = "qwenclip-target-cache";
/// `version` of the manifests this code writes and reads.
pub const CACHE_VERSION: u32 = 1;
/// Name of the manifest inside a cache folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// How many shards [`TargetCache::get_batch`] keeps memory-mapped at once.
const MAPPED_SHARDS: usize = 32;

/// The teacher as the cache sees it.
pub trait TargetSource {
    /// Identifies the teacher's weights and settings: a cache is reused only by a source
    /// with the same fingerprint.
    fn fingerprint(&self) -> String;
    /// Human description (e.g. the model path), recorded in the manifest.
    fn describe(&self) -> String;
    /// prompt_embeds [B,S,D] f32, pooled [B,P] f32, dropped tokens per caption.
    fn encode(&self, captions: &[&str]) -> Result<(Tensor, Tensor, Vec<usize>)>;
}

/// Options of [`build_cache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// Captions per shard file (default 256).
    pub shard_size: usize,
    /// Captions per teacher call (default 16). Batches never straddle shards.
    pub batch_size: usize,
    /// Store f16 instead of f32 (half the disk; read back as f32).
    pub f16: bool,
    /// Replace a cache made with another teacher, other captions, dtype or shard size (or a
    /// folder with an unreadable manifest) instead of refusing.
    pub overwrite: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            shard_size: 256,
            batch_size: 16,
            f16: false,
            overwrite: false,
        }
    }
}

/// Reported after every teacher batch (and once at the start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheProgress {
    /// Captions cached, those kept from an earlier run included.
    pub done: usize,
    pub total: usize,
    /// Captions kept from an earlier (interrupted) run.
    pub resumed: usize,
    /// Seconds since this run started.
    pub elapsed_s: f64,
    /// Estimated seconds left; `None` until a batch was computed in this run.
    pub eta_s: Option<f64>,
    /// Captions computed per second in this run (0 before the first batch).
    pub captions_per_s: f64,
}

/// `[=====>    ] 512/2000 25% 41.2 captions/s ETA 0:36`: one line for a terminal (print it
/// with `\r` to stderr).
pub fn progress_line(p: &CacheProgress) -> String {
    const WIDTH: usize = 20;
    let frac = if p.total == 0 {
        1.0
    } else {
        (p.done as f64 / p.total as f64).clamp(0.0, 1.0)
    };
    let filled = ((frac * WIDTH as f64).floor() as usize).min(WIDTH);
    let mut bar = "=".repeat(filled);
    if filled < WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat(WIDTH - filled - 1));
    }
    let eta = match p.eta_s {
        Some(s) if s.is_finite() => format_duration(s),
        _ => "--:--".to_string(),
    };
    format!(
        "[{bar}] {}/{} {}% {:.1} captions/s ETA {eta}",
        p.done,
        p.total,
        (frac * 100.0).floor() as usize,
        p.captions_per_s
    )
}

fn format_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// Sizes of the cached tensors: prompt_embeds `[n, seq, embed]`, pooled `[n, pooled]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheDims {
    pub seq: usize,
    pub embed: usize,
    pub pooled: usize,
}

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside the cache folder (`shard-00000.safetensors`).
    pub file: String,
    /// Position of its first caption.
    pub start: usize,
    /// Captions in it.
    pub count: usize,
    /// sha256 of the whole file, lowercase hex.
    pub sha256: String,
    /// File size in bytes (checked on every open, even unverified).
    pub bytes: u64,
    /// Captions of this shard the teacher truncated.
    pub truncated: usize,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub teacher_fingerprint: String,
    /// [`TargetSource::describe`] of the teacher.
    pub teacher: String,
    pub captions_fingerprint: String,
    /// [`caption_hash`] of every caption, in order.
    pub caption_hashes: Vec<String>,
    /// The caption texts, in order.
    pub captions: Vec<String>,
    pub count: usize,
    pub shard_size: usize,
    /// `"f32"` or `"f16"`.
    pub dtype: String,
    pub dims: CacheDims,
    /// Captions the teacher truncated (in finished shards).
    pub truncated: usize,
    /// Finished shards, by `start`.
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// Shards the whole cache has when complete.
    pub fn shard_count(&self) -> usize {
        self.count.div_ceil(self.shard_size.max(1))
    }

    /// Whether every shard is finished.
    pub fn is_complete(&self) -> bool {
        self.shards.iter().map(|s| s.count).sum::<usize>() == self.count
            && self.shards.len() == self.shard_count()
    }
}

/// File name of shard `k`.
pub fn shard_file_name(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

fn is_shard_file_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|d| d.len() >= 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Temporary files of [`write_atomic`] for our own files, left by a killed run.
fn is_our_temp_file(name: &str) -> bool {
    (name.starts_with(".shard-") || name.starts_with(".manifest.json")) && name.contains(".tmp")
}

fn dtype_name(f16: bool) -> &'static str {
    if f16 {
        "f16"
    } else {
        "f32"
    }
}

// ---------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------

/// Computes (or finishes) the target cache of `captions` in `out` with `source`.
///
/// When `out` already holds a cache with the same teacher fingerprint, captions, dtype and
/// shard size, its finished shards are verified (sha256) and kept, and only the missing (or
/// corrupt) ones are computed. A cache made with anything else is refused with the reason
/// unless `opts.overwrite`. A folder without a manifest must be empty (or hold only shard
/// files of an earlier run) unless `opts.overwrite`.
///
/// `progress` is called once at the start and after every teacher batch.
pub fn build_cache(
    source: &dyn TargetSource,
    captions: &CaptionSet,
    out: &Path,
    opts: &CacheOptions,
    progress: &mut dyn FnMut(&CacheProgress),
) -> Result<TargetCache> {
    if opts.shard_size == 0 || opts.batch_size == 0 {
        return Err(Error::Invalid(format!(
            "shard size and batch size must be at least 1 (got {} and {})",
            opts.shard_size, opts.batch_size
        )));
    }
    if captions.is_empty() {
        return Err(Error::format(
            &captions.report.source,
            "no captions to cache",
        ));
    }
    let started = Instant::now();
    let total = captions.len();
    let hashes = captions.hashes();
    let captions_fingerprint = fingerprint_of_hashes(&hashes);
    let teacher_fingerprint = source.fingerprint();
    let dtype = dtype_name(opts.f16);

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join(MANIFEST_FILE);
    remove_temp_files(out)?;

    // What an earlier run left.
    let mut kept: Vec<ShardEntry> = Vec::new();
    let mut dims: Option<CacheDims> = None;
    if manifest_path.exists() {
        match read_json::<Manifest>(&manifest_path, "target cache manifest") {
            Err(e) => {
                if !opts.overwrite {
                    return Err(Error::format(
                        &manifest_path,
                        format!(
                            "cannot resume this cache, its manifest is unreadable ({e}); pass --overwrite to rebuild it, or choose another output folder"
                        ),
                    ));
                }
                wipe_cache(out)?;
            }
            Ok(old) => {
                let mut reasons = Vec::new();
                if old.format != CACHE_FORMAT || old.version != CACHE_VERSION {
                    reasons.push(format!(
                        "it is `{}` version {}, not `{CACHE_FORMAT}` version {CACHE_VERSION}",
                        old.format, old.version
                    ));
                } else {
                    if old.teacher_fingerprint != teacher_fingerprint {
                        reasons.push(format!(
                            "it was made with another teacher ({} [{}]; now {} [{}])",
                            old.teacher,
                            old.teacher_fingerprint,
                            source.describe(),
                            teacher_fingerprint
                        ));
                    }
                    if old.captions_fingerprint != captions_fingerprint
                        || old.caption_hashes != hashes
                    {
                        let diff = describe_caption_diff(
                            &old.caption_hashes,
                            Some(&old.captions),
                            &hashes,
                            &captions.captions,
                        );
                        reasons.push(format!("it was made for other captions ({diff})"));
                    }
                    if old.dtype != dtype {
                        reasons.push(format!("it stores {}, {dtype} was asked for", old.dtype));
                    }
                    if old.shard_size != opts.shard_size {
                        reasons.push(format!(
                            "its shard size is {}, {} was asked for",
                            old.shard_size, opts.shard_size
                        ));
                    }
                }
                if reasons.is_empty() {
                    kept = verified_shards(out, &old);
                    if !kept.is_empty() {
                        dims = Some(old.dims);
                    }
                } else if opts.overwrite {
                    wipe_cache(out)?;
                } else {
                    return Err(Error::format(
                        &manifest_path,
                        format!(
                            "cannot resume the cache in {}: {}; pass --overwrite to replace it, or choose another output folder",
                            out.display(),
                            reasons.join("; ")
                        ),
                    ));
                }
            }
        }
    } else {
        let foreign = foreign_entries(out)?;
        if !foreign.is_empty() && !opts.overwrite {
            return Err(Error::format(
                out,
                format!(
                    "this folder is not empty and is not a target cache (no {MANIFEST_FILE}; it holds {}); choose a new or empty folder, or pass --overwrite to write the cache next to these files",
                    foreign.join(", ")
                ),
            ));
        }
        wipe_cache(out)?;
    }

    let shard_count = total.div_ceil(opts.shard_size);
    let resumed: usize = kept.iter().map(|s| s.count).sum();
    let kept_starts: HashSet<usize> = kept.iter().map(|s| s.start).collect();
    let mut manifest = Manifest {
        format: CACHE_FORMAT.to_string(),
        version: CACHE_VERSION,
        teacher_fingerprint,
        teacher: source.describe(),
        captions_fingerprint,
        caption_hashes: hashes,
        captions: captions.captions.clone(),
        count: total,
        shard_size: opts.shard_size,
        dtype: dtype.to_string(),
        dims: dims.unwrap_or(CacheDims {
            seq: 0,
            embed: 0,
            pooled: 0,
        }),
        truncated: kept.iter().map(|s| s.truncated).sum(),
        shards: kept,
    };

    let mut done = resumed;
    let mut computed = 0usize;
    let report = |done: usize, computed: usize, progress: &mut dyn FnMut(&CacheProgress)| {
        let elapsed_s = started.elapsed().as_secs_f64();
        let rate = if computed > 0 && elapsed_s > 0.0 {
            computed as f64 / elapsed_s
        } else {
            0.0
        };
        let eta_s = (rate > 0.0).then(|| (total - done) as f64 / rate);
        progress(&CacheProgress {
            done,
            total,
            resumed,
            elapsed_s,
            eta_s,
            captions_per_s: rate,
        });
    };
    report(done, computed, progress);

    for k in 0..shard_count {
        let start = k * opts.shard_size;
        if kept_starts.contains(&start) {
            continue;
        }
        let end = (start + opts.shard_size).min(total);
        let mut embeds = Vec::new();
        let mut pooled = Vec::new();
        let mut truncated = 0usize;
        let mut b = start;
        while b < end {
            let e = (b + opts.batch_size).min(end);
            let batch: Vec<&str> = captions.captions[b..e].iter().map(String::as_str).collect();
            let (pe, po, dropped) = source.encode(&batch)?;
            let got = check_batch(source, &pe, &po, &dropped, batch.len())?;
            match dims {
                None => dims = Some(got),
                Some(d) if d != got => {
                    return Err(Error::Invalid(format!(
                        "teacher {} returned prompt_embeds [_, {}, {}] / pooled [_, {}] for captions {b}..{e}, but the cache holds [_, {}, {}] / [_, {}]",
                        source.describe(),
                        got.seq,
                        got.embed,
                        got.pooled,
                        d.seq,
                        d.embed,
                        d.pooled
                    )))
                }
                Some(_) => {}
            }
            embeds.push(pe.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
            pooled.push(po.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
            truncated += dropped.iter().filter(|&&d| d > 0).count();
            computed += e - b;
            done += e - b;
            b = e;
            report(done, computed, progress);
        }
        let embeds = Tensor::cat(&embeds, 0)?;
        let pooled = Tensor::cat(&pooled, 0)?;
        let file = shard_file_name(k);
        let path = out.join(&file);
        let data = serialize_shard(
            &path,
            &embeds,
            &pooled,
            start,
            end - start,
            opts.f16,
            &manifest.teacher_fingerprint,
        )?;
        let sha256 = sha256_hex(&data);
        write_atomic(&path, &data)?;
        manifest.shards.push(ShardEntry {
            file,
            start,
            count: end - start,
            sha256,
            bytes: data.len() as u64,
            truncated,
        });
        manifest.shards.sort_by_key(|s| s.start);
        manifest.truncated = manifest.shards.iter().map(|s| s.truncated).sum();
        if let Some(d) = dims {
            manifest.dims = d;
        }
        write_manifest(&manifest_path, &manifest)?;
    }
    // Also rewritten when everything was resumed (e.g. a new teacher description).
    write_manifest(&manifest_path, &manifest)?;
    Ok(TargetCache::from_parts(out.to_path_buf(), manifest))
}

fn write_manifest(path: &Path, manifest: &Manifest) -> Result<()> {
    let mut text = serde_json::to_string_pretty(manifest)
        .map_err(|e| Error::format(path, format!("cannot serialise the manifest: {e}")))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Checks the shapes a teacher batch came back with; returns its dims.
fn check_batch(
    source: &dyn TargetSource,
    pe: &Tensor,
    po: &Tensor,
    dropped: &[usize],
    n: usize,
) -> Result<CacheDims> {
    let (ped, pod) = (pe.dims(), po.dims());
    if ped.len() != 3 || ped[0] != n || pod.len() != 2 || pod[0] != n || dropped.len() != n {
        return Err(Error::Invalid(format!(
            "teacher {} returned prompt_embeds {ped:?}, pooled {pod:?} and {} dropped-token counts for {n} captions; expected [{n}, S, D], [{n}, P] and {n}",
            source.describe(),
            dropped.len()
        )));
    }
    if ped[1] == 0 || ped[2] == 0 || pod[1] == 0 {
        return Err(Error::Invalid(format!(
            "teacher {} returned empty tensors: prompt_embeds {ped:?}, pooled {pod:?}",
            source.describe()
        )));
    }
    Ok(CacheDims {
        seq: ped[1],
        embed: ped[2],
        pooled: pod[1],
    })
}

/// Finished shards of a matching manifest whose files are intact; the others are dropped
/// (and recomputed).
fn verified_shards(dir: &Path, old: &Manifest) -> Vec<ShardEntry> {
    let mut ok = Vec::new();
    for (k, expected) in expected_layout(old.count, old.shard_size)
        .into_iter()
        .enumerate()
    {
        let Some(entry) = old.shards.iter().find(|s| s.start == expected.0) else {
            continue;
        };
        if entry.count != expected.1 || entry.file != shard_file_name(k) {
            continue;
        }
        let path = dir.join(&entry.file);
        if let Ok(sha) = sha256_file(&path) {
            if sha == entry.sha256 {
                ok.push(entry.clone());
            }
        }
    }
    ok
}

/// (start, count) of every shard.
fn expected_layout(count: usize, shard_size: usize) -> Vec<(usize, usize)> {
    (0..count.div_ceil(shard_size.max(1)))
        .map(|k| {
            let start = k * shard_size;
            (start, shard_size.min(count - start))
        })
        .collect()
}

/// Removes the manifest, then every shard file and our temporary files.
fn wipe_cache(dir: &Path) -> Result<()> {
    let manifest = dir.join(MANIFEST_FILE);
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(|e| Error::io(&manifest, e))?;
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if is_shard_file_name(&name) || is_our_temp_file(&name) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn remove_temp_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if is_our_temp_file(&entry.file_name().to_string_lossy()) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Entries of a folder that a cache build would not have written (up to 5 named).
fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !is_shard_file_name(&name) && !is_our_temp_file(&name) {
            names.push(name);
        }
    }
    names.sort();
    if names.len() > 5 {
        let more = names.len() - 5;
        names.truncate(5);
        names.push(format!("and {more} more"));
    }
    Ok(names)
}

/// Raw little-endian tensor bytes for the safetensors writer.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw_float(t: &Tensor, f16: bool) -> Result<RawTensor> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, data) = if f16 {
        let v = flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
        let mut data = Vec::with_capacity(v.len() * 2);
        for x in &v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        (safetensors::Dtype::F16, data)
    } else {
        let v = flat.to_vec1::<f32>()?;
        let mut data = Vec::with_capacity(v.len() * 4);
        for x in &v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        (safetensors::Dtype::F32, data)
    };
    Ok(RawTensor { dtype, shape, data })
}

fn serialize_shard(
    path: &Path,
    embeds: &Tensor,
    pooled: &Tensor,
    start: usize,
    count: usize,
    f16: bool,
    teacher_fingerprint: &str,
) -> Result<Vec<u8>> {
    let index = RawTensor {
        dtype: safetensors::Dtype::U32,
        shape: vec![count],
        data: (start..start + count)
            .flat_map(|i| (i as u32).to_le_bytes())
            .collect(),
    };
    let embeds = raw_float(embeds, f16)?;
    let pooled = raw_float(pooled, f16)?;
    // One metadata key: the header's metadata map is written in hash-map order, and shard
    // files must be byte-for-byte reproducible.
    let info = serde_json::json!({
        "format": CACHE_FORMAT,
        "start": start,
        "count": count,
        "teacher_fingerprint": teacher_fingerprint,
    });
    let meta = HashMap::from([("qwenclip".to_string(), info.to_string())]);
    safetensors::tensor::serialize(
        [
            ("index", &index),
            ("pooled", &pooled),
            ("prompt_embeds", &embeds),
        ],
        Some(meta),
    )
    .map_err(|e| Error::format(path, format!("cannot serialise the shard: {e}")))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// "caption 17 changed (cache: "…", now: "…"); 3 captions added" — how two ordered caption
/// lists differ. Numbers are 1-based positions in the caption set.
fn describe_caption_diff(
    cached_hashes: &[String],
    cached_texts: Option<&[String]>,
    now_hashes: &[String],
    now_texts: &[String],
) -> String {
    let mut parts = Vec::new();
    let common = cached_hashes.len().min(now_hashes.len());
    let changed: Vec<usize> = (0..common)
        .filter(|&i| cached_hashes[i] != now_hashes[i])
        .collect();
    if let Some(&i) = changed.first() {
        let was = cached_texts
            .and_then(|t| t.get(i))
            .map(|t| format!("cache: \"{}\", ", excerpt(t)))
            .unwrap_or_default();
        let now = now_texts
            .get(i)
            .map(|t| format!("now: \"{}\"", excerpt(t)))
            .unwrap_or_default();
        let mut s = format!("caption {} changed ({was}{now})", i + 1);
        if changed.len() > 1 {
            s.push_str(&format!(
                "; {} captions differ at the same position",
                changed.len()
            ));
        }
        parts.push(s);
    }
    let cached_set: HashSet<&String> = cached_hashes.iter().collect();
    let now_set: HashSet<&String> = now_hashes.iter().collect();
    let added = now_hashes
        .iter()
        .filter(|h| !cached_set.contains(h))
        .count();
    let removed = cached_hashes
        .iter()
        .filter(|h| !now_set.contains(h))
        .count();
    let plural = |n: usize| if n == 1 { "caption" } else { "captions" };
    // Captions edited in place: "caption 5 changed" says it all.
    let in_place = cached_hashes.len() == now_hashes.len()
        && added == changed.len()
        && removed == changed.len();
    if in_place && !changed.is_empty() {
        return parts.join("; ");
    }
    if added > 0 {
        parts.push(format!("{added} {} added", plural(added)));
    }
    if removed > 0 {
        parts.push(format!("{removed} {} removed", plural(removed)));
    }
    if added == 0 && removed == 0 && !changed.is_empty() {
        parts.push("the same captions in another order".into());
    }
    if parts.is_empty() {
        parts.push("caption fingerprints differ".into());
    }
    parts.join("; ")
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut e: String = s.chars().take(MAX).collect();
        e.push('…');
        e
    }
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// A finished target cache, open for reading. `Send + Sync`: `get_batch` takes `&self`.
pub struct TargetCache {
    dir: PathBuf,
    manifest: Manifest,
    mapped: Mutex<Vec<(usize, Arc<MmapedSafetensors>)>>,
}

impl std::fmt::Debug for TargetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetCache")
            .field("dir", &self.dir)
            .field("count", &self.manifest.count)
            .field("dims", &self.manifest.dims)
            .field("dtype", &self.manifest.dtype)
            .finish()
    }
}

impl TargetCache {
    fn from_parts(dir: PathBuf, manifest: Manifest) -> Self {
        Self {
            dir,
            manifest,
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// Opens a cache, validating its manifest and the sha256 of every shard.
    pub fn open(dir: &Path) -> Result<Self> {
        let cache = Self::open_unverified(dir)?;
        cache.verify()?;
        Ok(cache)
    }

    /// Opens a cache, validating its manifest, that every shard is present and of the
    /// recorded size, without hashing the shards (fast for big caches).
    pub fn open_unverified(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            let msg = if dir.is_dir() {
                format!("not a target cache (no {MANIFEST_FILE}); build one with cache-targets")
            } else {
                "no such folder".to_string()
            };
            return Err(Error::format(dir, msg));
        }
        let m: Manifest = read_json(&path, "target cache manifest")?;
        let bad = |msg: String| Error::format(&path, msg);
        if m.format != CACHE_FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{CACHE_FORMAT}`",
                m.format
            )));
        }
        if m.version != CACHE_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this build reads version {CACHE_VERSION}); rebuild the cache with cache-targets",
                m.version
            )));
        }
        if m.dtype != "f32" && m.dtype != "f16" {
            return Err(bad(format!("dtype `{}`, expected f32 or f16", m.dtype)));
        }
        if m.count == 0 || m.captions.len() != m.count || m.caption_hashes.len() != m.count {
            return Err(bad(format!(
                "counts do not add up: count {}, {} captions, {} caption hashes",
                m.count,
                m.captions.len(),
                m.caption_hashes.len()
            )));
        }
        if m.shard_size == 0 || m.dims.seq == 0 || m.dims.embed == 0 || m.dims.pooled == 0 {
            return Err(bad(format!(
                "shard_size {} and dims {:?} must be positive",
                m.shard_size, m.dims
            )));
        }
        if let Some(i) = m
            .captions
            .iter()
            .zip(&m.caption_hashes)
            .position(|(c, h)| caption_hash(c) != *h)
        {
            return Err(bad(format!(
                "caption {} does not match its hash (was the manifest edited?); rebuild the cache with cache-targets",
                i + 1
            )));
        }
        if fingerprint_of_hashes(&m.caption_hashes) != m.captions_fingerprint {
            return Err(bad(
                "captions_fingerprint does not match caption_hashes (was the manifest edited?)"
                    .into(),
            ));
        }
        let layout = expected_layout(m.count, m.shard_size);
        let cached: usize = m.shards.iter().map(|s| s.count).sum();
        if m.shards.len() < layout.len() && cached < m.count {
            return Err(bad(format!(
                "the cache is incomplete: {cached} of {} captions ({} of {} shards); rerun cache-targets with the same teacher and captions to finish it",
                m.count,
                m.shards.len(),
                layout.len()
            )));
        }
        if m.shards.len() != layout.len() {
            return Err(bad(format!(
                "{} shards listed, {} expected for {} captions in shards of {}",
                m.shards.len(),
                layout.len(),
                m.count,
                m.shard_size
            )));
        }
        for (k, (s, &(start, count))) in m.shards.iter().zip(&layout).enumerate() {
            if s.start != start || s.count != count || s.file != shard_file_name(k) {
                return Err(bad(format!(
                    "shard {k} is listed as {} (start {}, count {}), expected {} (start {start}, count {count})",
                    s.file,
                    s.start,
                    s.count,
                    shard_file_name(k)
                )));
            }
        }
        if m.truncated != m.shards.iter().map(|s| s.truncated).sum::<usize>() {
            return Err(bad(
                "truncated does not equal the sum over the shards".into()
            ));
        }
        for s in &m.shards {
            let p = dir.join(&s.file);
            let meta = std::fs::metadata(&p).map_err(|_| {
                Error::format(
                    &p,
                    "shard file is missing; rerun cache-targets (same teacher and captions) to rebuild it",
                )
            })?;
            if meta.len() != s.bytes {
                return Err(Error::format(
                    &p,
                    format!(
                        "shard is corrupt: {} bytes, the manifest says {}; rerun cache-targets (same teacher and captions) to rebuild it",
                        meta.len(),
                        s.bytes
                    ),
                ));
            }
        }
        Ok(Self::from_parts(dir.to_path_buf(), m))
    }

    /// Checks the sha256 of every shard (what [`TargetCache::open`] does).
    pub fn verify(&self) -> Result<()> {
        for s in &self.manifest.shards {
            let p = self.dir.join(&s.file);
            let sha = sha256_file(&p).map_err(|e| Error::io(&p, e))?;
            if sha != s.sha256 {
                return Err(Error::format(
                    &p,
                    format!(
                        "shard is corrupt (sha256 {sha}, the manifest says {}); rerun cache-targets (same teacher and captions) to rebuild it",
                        s.sha256
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a cache made with another teacher (`source_fingerprint`) or for other
    /// captions, saying what differs.
    pub fn check_against(
        &self,
        source_fingerprint: Option<&str>,
        captions: Option<&CaptionSet>,
    ) -> Result<()> {
        let path = self.dir.join(MANIFEST_FILE);
        if let Some(fp) = source_fingerprint {
            if fp != self.manifest.teacher_fingerprint {
                return Err(Error::format(
                    &path,
                    format!(
                        "this cache was made with another teacher ({} [{}], not [{fp}]); rerun cache-targets with this teacher into a new folder (or with --overwrite)",
                        self.manifest.teacher, self.manifest.teacher_fingerprint
                    ),
                ));
            }
        }
        if let Some(c) = captions {
            let hashes = c.hashes();
            if hashes != self.manifest.caption_hashes {
                let diff = describe_caption_diff(
                    &self.manifest.caption_hashes,
                    Some(&self.manifest.captions),
                    &hashes,
                    &c.captions,
                );
                return Err(Error::format(
                    &path,
                    format!(
                        "this cache was made for other captions than {}: {diff}; rerun cache-targets with these captions",
                        c.report.source.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.manifest.count
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.count == 0
    }

    /// Caption texts, in cache order (index `i` of [`TargetCache::get_batch`]).
    pub fn captions(&self) -> &[String] {
        &self.manifest.captions
    }

    pub fn dims(&self) -> CacheDims {
        self.manifest.dims
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Targets of the given captions (positions in the cache, any order, repeats allowed):
    /// prompt_embeds `[n, seq, embed]` and pooled `[n, pooled]`, f32 on `device`.
    /// Shards are memory-mapped as needed (the last few stay mapped).
    pub fn get_batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        if indices.is_empty() {
            return Err(Error::Invalid("get_batch: no indices".into()));
        }
        let CacheDims { seq, embed, pooled } = self.manifest.dims;
        let row_e = seq * embed;
        let mut out_e = Vec::with_capacity(indices.len() * row_e);
        let mut out_p = Vec::with_capacity(indices.len() * pooled);
        let f16 = self.manifest.dtype == "f16";
        for &i in indices {
            if i >= self.manifest.count {
                return Err(Error::Invalid(format!(
                    "caption index {i} is out of range: the cache in {} holds {} captions",
                    self.dir.display(),
                    self.manifest.count
                )));
            }
            let k = i / self.manifest.shard_size;
            let row = i - self.manifest.shards[k].start;
            let st = self.shard(k)?;
            let path = self.dir.join(&self.manifest.shards[k].file);
            let ve = st
                .get("prompt_embeds")
                .map_err(|e| Error::format(&path, format!("tensor `prompt_embeds`: {e}")))?;
            let vp = st
                .get("pooled")
                .map_err(|e| Error::format(&path, format!("tensor `pooled`: {e}")))?;
            push_row(&mut out_e, ve.data(), row, row_e, f16);
            push_row(&mut out_p, vp.data(), row, pooled, f16);
        }
        let n = indices.len();
        let e = Tensor::from_vec(out_e, (n, seq, embed), &Device::Cpu)?.to_device(device)?;
        let p = Tensor::from_vec(out_p, (n, pooled), &Device::Cpu)?.to_device(device)?;
        Ok((e, p))
    }

    /// Shard `k`, mapped and checked (tensor names, dtypes, shapes, index), through the LRU.
    fn shard(&self, k: usize) -> Result<Arc<MmapedSafetensors>> {
        let mut lru = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = lru.iter().position(|(i, _)| *i == k) {
            let item = lru.remove(pos);
            let st = item.1.clone();
            lru.push(item);
            return Ok(st);
        }
        let entry = &self.manifest.shards[k];
        let path = self.dir.join(&entry.file);
        // Safety: mapped read-only; shards are only ever replaced by rename, which leaves an
        // existing mapping intact.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
            Error::format(
                &path,
                format!("not a valid shard ({e}); rerun cache-targets (same teacher and captions) to rebuild it"),
            )
        })?;
        self.check_shard(&path, &st, entry)?;
        let st = Arc::new(st);
        if lru.len() >= MAPPED_SHARDS {
            lru.remove(0);
        }
        lru.push((k, st.clone()));
        Ok(st)
    }

    fn check_shard(&self, path: &Path, st: &MmapedSafetensors, entry: &ShardEntry) -> Result<()> {
        let d = self.manifest.dims;
        let float = if self.manifest.dtype == "f16" {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::F32
        };
        let n = entry.count;
        let expect: [(&str, safetensors::Dtype, Vec<usize>); 3] = [
            ("prompt_embeds", float, vec![n, d.seq, d.embed]),
            ("pooled", float, vec![n, d.pooled]),
            ("index", safetensors::Dtype::U32, vec![n]),
        ];
        for (name, dtype, shape) in expect {
            let v = st.get(name).map_err(|_| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
            if v.shape() != shape.as_slice() {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: shape,
                    got: v.shape().to_vec(),
                });
            }
            if v.dtype() != dtype {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` is {:?}, expected {dtype:?}", v.dtype()),
                ));
            }
            if name == "index" {
                let ok = v.data().chunks_exact(4).enumerate().all(|(i, b)| {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize == entry.start + i
                });
                if !ok {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `index` does not hold captions {}..{}; rerun cache-targets to rebuild this shard",
                            entry.start,
                            entry.start + n
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deterministic split into (train, held_out) caption indices, both sorted. `held_out` is
    /// the held-out fraction; when it is > 0 and the cache has at least 2 captions, at least
    /// one is held out and at least one is kept for training.
    pub fn split(&self, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        split_indices(self.len(), held_out, seed)
    }
}

/// [`TargetCache::split`] for `n` items.
pub fn split_indices(n: usize, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let frac = if held_out.is_finite() {
        held_out.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut n_held = (n as f64 * frac).round() as usize;
    if frac > 0.0 && n >= 2 {
        n_held = n_held.clamp(1, n - 1);
    } else if n < 2 {
        n_held = 0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    crate::rng::Rng::new(seed).shuffle(&mut order);
    let mut held: Vec<usize> = order[..n_held].to_vec();
    let mut train: Vec<usize> = order[n_held..].to_vec();
    held.sort_unstable();
    train.sort_unstable();
    (train, held)
}

fn push_row(out: &mut Vec<f32>, data: &[u8], row: usize, row_len: usize, f16: bool) {
    if f16 {
        let bytes = &data[row * row_len * 2..(row + 1) * row_len * 2];
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        );
    } else {
        let bytes = &data[row * row_len * 4..(row + 1) * row_len * 4];
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
}
