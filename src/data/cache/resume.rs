//! Resume policy: whether what an earlier run left in the output folder is continued,
//! replaced, or refused with the reasons.

use std::path::Path;

use super::caption_diff::describe_caption_diff;
use super::cleanup::foreign_entries;
use super::manifest::expected_layout;
use super::shard::sha256_file;
use super::MANIFEST_FILE;
use super::{shard_file_name, Manifest, ShardEntry, TargetDims, CACHE_FORMAT, CACHE_VERSION};
use crate::error::{read_json, Error, Result};

/// What a build does with the folder it writes into.
pub(super) enum Resume {
    /// Continue the cache there: its intact finished shards are kept (the others are
    /// recomputed), and their sizes with them.
    Keep {
        shards: Vec<ShardEntry>,
        dims: Option<TargetDims>,
    },
    /// Start afresh: the cache files there are to be removed first.
    Restart,
}

/// Decides for a build of `wanted` (its manifest before any shard) in `dir`. A cache of the
/// same teacher, captions, dtype and shard size is continued; anything else (another
/// cache, an unreadable manifest, or files a build did not write) is refused unless
/// `overwrite`.
pub(super) fn plan(dir: &Path, wanted: &Manifest, overwrite: bool) -> Result<Resume> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.exists() {
        let foreign = foreign_entries(dir)?;
        if !foreign.is_empty() && !overwrite {
            return Err(Error::format(
                dir,
                format!(
                    "this folder is not empty and is not a target cache (no {MANIFEST_FILE}; it holds {}); choose a new or empty folder, or pass --overwrite to write the cache next to these files",
                    foreign.join(", ")
                ),
            ));
        }
        return Ok(Resume::Restart);
    }
    let old = match read_json::<Manifest>(&manifest_path, "target cache manifest") {
        Ok(old) => old,
        Err(_) if overwrite => return Ok(Resume::Restart),
        Err(e) => {
            return Err(Error::format(
                &manifest_path,
                format!(
                    "cannot resume this cache, its manifest is unreadable ({e}); pass --overwrite to rebuild it, or choose another output folder"
                ),
            ))
        }
    };
    let reasons = reasons_not_to_resume(&old, wanted);
    if reasons.is_empty() {
        let shards = verified_shards(dir, &old);
        let dims = (!shards.is_empty()).then_some(old.dims);
        Ok(Resume::Keep { shards, dims })
    } else if overwrite {
        Ok(Resume::Restart)
    } else {
        Err(Error::format(
            &manifest_path,
            format!(
                "cannot resume the cache in {}: {}; pass --overwrite to replace it, or choose another output folder",
                dir.display(),
                reasons.join("; ")
            ),
        ))
    }
}

/// Why the cache `old` cannot be continued into `wanted`; empty when it can.
fn reasons_not_to_resume(old: &Manifest, wanted: &Manifest) -> Vec<String> {
    let mut reasons = Vec::new();
    if old.format != CACHE_FORMAT || old.version != CACHE_VERSION {
        reasons.push(format!(
            "it is `{}` version {}, not `{CACHE_FORMAT}` version {CACHE_VERSION}",
            old.format, old.version
        ));
        return reasons;
    }
    if old.teacher_fingerprint != wanted.teacher_fingerprint {
        reasons.push(format!(
            "it was made with another teacher ({} [{}]; now {} [{}])",
            old.teacher, old.teacher_fingerprint, wanted.teacher, wanted.teacher_fingerprint
        ));
    }
    if old.captions_fingerprint != wanted.captions_fingerprint
        || old.caption_hashes != wanted.caption_hashes
    {
        let diff = describe_caption_diff(
            &old.caption_hashes,
            Some(&old.captions),
            &wanted.caption_hashes,
            &wanted.captions,
        );
        reasons.push(format!("it was made for other captions ({diff})"));
    }
    if old.dtype != wanted.dtype {
        reasons.push(format!(
            "it stores {}, {} was asked for",
            old.dtype, wanted.dtype
        ));
    }
    if old.shard_size != wanted.shard_size {
        reasons.push(format!(
            "its shard size is {}, {} was asked for",
            old.shard_size, wanted.shard_size
        ));
    }
    reasons
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
