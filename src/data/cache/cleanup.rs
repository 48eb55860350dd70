//! Clean-up of a cache folder: the files an earlier (possibly killed) build left, and the
//! entries that are not a cache's at all.

use std::path::Path;

use super::MANIFEST_FILE;
use crate::error::{Error, Result};
use crate::formats::atomic::{remove_stale_temps, temp_target};

/// Removes the manifest, then every shard file and our temporary files. The manifest goes
/// first so that a clean-up cut short never leaves a manifest listing missing shards.
pub(super) fn wipe_cache(dir: &Path) -> Result<()> {
    let manifest = dir.join(MANIFEST_FILE);
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(|e| Error::io(&manifest, e))?;
    }
    remove_files(dir, |name| {
        is_shard_file_name(name) || is_our_temp_file(name)
    })
}

/// Removes the temporary files a killed build left.
pub(super) fn remove_temp_files(dir: &Path) -> Result<()> {
    remove_stale_temps(dir, is_cache_file_name)
}

/// Entries of a folder that a cache build would not have written (up to 5 named).
pub(super) fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
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

fn remove_files(dir: &Path, remove: impl Fn(&str) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if remove(&entry.file_name().to_string_lossy()) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn is_shard_file_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|d| d.len() >= 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

fn is_cache_file_name(name: &str) -> bool {
    name == MANIFEST_FILE || is_shard_file_name(name)
}

/// Temporary files of [`write_atomic`](crate::formats::safetensors::write_atomic) for our own
/// files, left by a killed run.
fn is_our_temp_file(name: &str) -> bool {
    temp_target(name).is_some_and(is_cache_file_name)
}
