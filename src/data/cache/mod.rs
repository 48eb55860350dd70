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

mod batch;
mod build;
mod caption_diff;
mod cleanup;
mod manifest;
mod reader;
mod resume;
mod shard;
mod split;

pub use build::{build_cache, CacheOptions, CacheProgress, TargetSource};
pub use manifest::{
    shard_file_name, Manifest, ShardEntry, TargetDims, CACHE_FORMAT, CACHE_VERSION, MANIFEST_FILE,
};
pub use reader::TargetCache;
pub use split::split_indices;
