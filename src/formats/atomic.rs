//! Replacing a file so that readers see the old one or the new one, never a part.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Replaces `path` with what `fill` writes: a temporary file in the same folder, fsync,
/// rename. A crash or a full disk leaves the previous file untouched; the temporary file is
/// removed on error. A killed process leaves it behind: it is named by [`temp_name`], and
/// the folders we write (target cache, run folder) remove such files when they are reopened.
pub fn replace_atomic(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(temp_name(&file_name.to_string_lossy()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(path, e))?;
        fill(&mut f)?;
        f.sync_all().map_err(|e| Error::io(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The temporary file that stands for `name` while this process replaces it.
fn temp_name(name: &str) -> String {
    format!(".{name}.tmp{}", std::process::id())
}

/// The file a temporary file of [`replace_atomic`] (any process's) was standing for, or `None`
/// when `name` is not one.
pub fn temp_target(name: &str) -> Option<&str> {
    let (target, pid) = name.strip_prefix('.')?.rsplit_once(".tmp")?;
    (!target.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .then_some(target)
}

/// Removes the temporary files that killed processes left in `dir` for files `ours` accepts
/// (this process's own are not stale: it is alive).
pub fn remove_stale_temps(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if temp_target(&name).is_some_and(|t| ours(t) && name != temp_name(t)) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::temp_target;

    #[test]
    fn temp_names_are_recognised_and_nothing_else() {
        assert_eq!(
            temp_target(".checkpoint.safetensors.tmp4242"),
            Some("checkpoint.safetensors")
        );
        assert_eq!(temp_target(&super::temp_name("a.json")), Some("a.json"));
        for other in [
            "checkpoint.safetensors",
            ".checkpoint.safetensors",
            ".checkpoint.safetensors.tmp",
            ".checkpoint.safetensors.tmp12x",
            "..tmp12",
            "x.tmp12",
        ] {
            assert_eq!(temp_target(other), None, "{other}");
        }
    }
}
