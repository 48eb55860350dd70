//! `manifest.json`: what a cache holds, with which teacher, for which captions, and which
//! shards are finished.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::captions::{caption_hash, fingerprint_of_hashes};
use crate::error::{Error, Result};
use crate::formats::safetensors::write_atomic;

/// `format` of every cache manifest.
pub const CACHE_FORMAT: &str = "qwenclip-target-cache";
/// `version` of the manifests this code writes and reads.
pub const CACHE_VERSION: u32 = 1;
/// Name of the manifest inside a cache folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What the teacher produces, and the cache holds: prompt embeddings `[n, seq, embed]` and
/// pooled `[n, pooled]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDims {
    pub seq: usize,
    pub embed: usize,
    pub pooled: usize,
}

impl TargetDims {
    pub const SDXL: Self = Self {
        seq: 77,
        embed: 2048,
        pooled: 1280,
    };
}

impl Default for TargetDims {
    fn default() -> Self {
        Self::SDXL
    }
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
    /// [`TargetSource::describe`](super::TargetSource::describe) of the teacher.
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
    pub dims: TargetDims,
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

    /// Records a finished shard, keeping the shards in order and the truncation count
    /// their sum.
    pub(super) fn add_shard(&mut self, entry: ShardEntry) {
        self.shards.push(entry);
        self.shards.sort_by_key(|s| s.start);
        self.truncated = self.shards.iter().map(|s| s.truncated).sum();
    }

    /// Writes the manifest atomically, so a killed build leaves the previous one.
    pub(super) fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::format(path, format!("cannot serialise the manifest: {e}")))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Checks that the manifest read from `path` is a finished cache this build reads, and
    /// that it was not edited: counts, hashes and the shard list must agree.
    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Error::format(path, msg);
        if self.format != CACHE_FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{CACHE_FORMAT}`",
                self.format
            )));
        }
        if self.version != CACHE_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this build reads version {CACHE_VERSION}); rebuild the cache with cache-targets",
                self.version
            )));
        }
        if self.dtype != "f32" && self.dtype != "f16" {
            return Err(bad(format!("dtype `{}`, expected f32 or f16", self.dtype)));
        }
        if self.count == 0
            || self.captions.len() != self.count
            || self.caption_hashes.len() != self.count
        {
            return Err(bad(format!(
                "counts do not add up: count {}, {} captions, {} caption hashes",
                self.count,
                self.captions.len(),
                self.caption_hashes.len()
            )));
        }
        if self.shard_size == 0
            || self.dims.seq == 0
            || self.dims.embed == 0
            || self.dims.pooled == 0
        {
            return Err(bad(format!(
                "shard_size {} and dims {:?} must be positive",
                self.shard_size, self.dims
            )));
        }
        if let Some(i) = self
            .captions
            .iter()
            .zip(&self.caption_hashes)
            .position(|(c, h)| caption_hash(c) != *h)
        {
            return Err(bad(format!(
                "caption {} does not match its hash (was the manifest edited?); rebuild the cache with cache-targets",
                i + 1
            )));
        }
        if fingerprint_of_hashes(&self.caption_hashes) != self.captions_fingerprint {
            return Err(bad(
                "captions_fingerprint does not match caption_hashes (was the manifest edited?)"
                    .into(),
            ));
        }
        let layout = expected_layout(self.count, self.shard_size);
        let cached: usize = self.shards.iter().map(|s| s.count).sum();
        if self.shards.len() < layout.len() && cached < self.count {
            return Err(bad(format!(
                "the cache is incomplete: {cached} of {} captions ({} of {} shards); rerun cache-targets with the same teacher and captions to finish it",
                self.count,
                self.shards.len(),
                layout.len()
            )));
        }
        if self.shards.len() != layout.len() {
            return Err(bad(format!(
                "{} shards listed, {} expected for {} captions in shards of {}",
                self.shards.len(),
                layout.len(),
                self.count,
                self.shard_size
            )));
        }
        for (k, (s, &(start, count))) in self.shards.iter().zip(&layout).enumerate() {
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
        if self.truncated != self.shards.iter().map(|s| s.truncated).sum::<usize>() {
            return Err(bad(
                "truncated does not equal the sum over the shards".into()
            ));
        }
        Ok(())
    }
}

/// File name of shard `k`.
pub fn shard_file_name(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

/// (start, count) of every shard.
pub(super) fn expected_layout(count: usize, shard_size: usize) -> Vec<(usize, usize)> {
    (0..count.div_ceil(shard_size.max(1)))
        .map(|k| {
            let start = k * shard_size;
            (start, shard_size.min(count - start))
        })
        .collect()
}

pub(super) fn dtype_name(f16: bool) -> &'static str {
    if f16 {
        "f16"
    } else {
        "f32"
    }
}
