//! [`build_cache`]: computes a cache, or finishes one an earlier run left. The steps are
//! in their own modules: the resume policy ([`resume`](super::resume)), clean-up
//! ([`cleanup`](super::cleanup)), batching ([`batch`](super::batch)) and shard files
//! ([`shard`](super::shard)).

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use super::batch::compute_shard;
use super::cleanup::{remove_temp_files, wipe_cache};
use super::manifest::dtype_name;
use super::resume::{self, Resume};
use super::shard::write_shard;
use super::{Manifest, TargetCache, TargetDims, CACHE_FORMAT, CACHE_VERSION, MANIFEST_FILE};
use crate::data::captions::{fingerprint_of_hashes, CaptionSet};
use crate::error::{Error, Result};

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
    let mut manifest = empty_manifest(source, captions, opts);

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join(MANIFEST_FILE);
    remove_temp_files(out)?;
    let (kept, mut dims) = match resume::plan(out, &manifest, opts.overwrite)? {
        Resume::Keep { shards, dims } => (shards, dims),
        Resume::Restart => {
            wipe_cache(out)?;
            (Vec::new(), None)
        }
    };
    let kept_starts: HashSet<usize> = kept.iter().map(|s| s.start).collect();
    let resumed = kept.iter().map(|s| s.count).sum();
    let mut tracker = Tracker {
        started,
        total,
        resumed,
        done: resumed,
        computed: 0,
        progress,
    };
    for entry in kept {
        manifest.add_shard(entry);
    }
    if let Some(d) = dims {
        manifest.dims = d;
    }
    tracker.report();

    for k in 0..total.div_ceil(opts.shard_size) {
        let start = k * opts.shard_size;
        if kept_starts.contains(&start) {
            continue;
        }
        let range = start..(start + opts.shard_size).min(total);
        let targets = compute_shard(
            source,
            &captions.captions,
            range.clone(),
            opts.batch_size,
            &mut dims,
            &mut |n| tracker.add_computed(n),
        )?;
        let entry = write_shard(
            out,
            k,
            range,
            &targets,
            opts.f16,
            &manifest.teacher_fingerprint,
        )?;
        manifest.add_shard(entry);
        if let Some(d) = dims {
            manifest.dims = d;
        }
        manifest.write(&manifest_path)?;
    }
    // Also rewritten when everything was resumed (e.g. a new teacher description).
    manifest.write(&manifest_path)?;
    Ok(TargetCache::from_parts(out.to_path_buf(), manifest))
}

/// The manifest of the cache `opts` asks for, before any shard is finished.
fn empty_manifest(
    source: &dyn TargetSource,
    captions: &CaptionSet,
    opts: &CacheOptions,
) -> Manifest {
    let hashes = captions.hashes();
    Manifest {
        format: CACHE_FORMAT.to_string(),
        version: CACHE_VERSION,
        teacher_fingerprint: source.fingerprint(),
        teacher: source.describe(),
        captions_fingerprint: fingerprint_of_hashes(&hashes),
        caption_hashes: hashes,
        captions: captions.captions.clone(),
        count: captions.len(),
        shard_size: opts.shard_size,
        dtype: dtype_name(opts.f16).to_string(),
        dims: TargetDims {
            seq: 0,
            embed: 0,
            pooled: 0,
        },
        truncated: 0,
        shards: Vec::new(),
    }
}

/// Counts the captions cached and reports them as [`CacheProgress`].
struct Tracker<'a> {
    started: Instant,
    total: usize,
    resumed: usize,
    done: usize,
    computed: usize,
    progress: &'a mut dyn FnMut(&CacheProgress),
}

impl Tracker<'_> {
    fn report(&mut self) {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let rate = if self.computed > 0 && elapsed_s > 0.0 {
            self.computed as f64 / elapsed_s
        } else {
            0.0
        };
        let eta_s = (rate > 0.0).then(|| (self.total - self.done) as f64 / rate);
        (self.progress)(&CacheProgress {
            done: self.done,
            total: self.total,
            resumed: self.resumed,
            elapsed_s,
            eta_s,
            captions_per_s: rate,
        });
    }

    /// `n` more captions computed in this run.
    fn add_computed(&mut self, n: usize) {
        self.computed += n;
        self.done += n;
        self.report();
    }
}
