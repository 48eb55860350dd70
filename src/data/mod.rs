//! Distillation data: caption sets ([`captions`]) and the cache of the teacher's outputs
//! for them ([`cache`]), which the trainer reads.

pub mod cache;
pub mod captions;
mod source;

pub use cache::{
    build_cache, shard_file_name, split_indices, CacheOptions, CacheProgress, Manifest, ShardEntry,
    TargetCache, TargetDims, TargetSource, CACHE_FORMAT, CACHE_VERSION, MANIFEST_FILE,
};
pub use captions::{
    caption_hash, fingerprint_of_hashes, load_caption_sources, load_captions, normalize,
    CaptionReport, CaptionSet, CAPTION_EXTENSIONS,
};
