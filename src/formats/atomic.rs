//! Replacing a file so that readers see the old one or the new one, never a part.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Replaces `path` with what `fill` writes: a temporary file in the same folder, fsync,
/// rename. A crash or a full disk leaves the previous file untouched; the temporary file is
/// removed on error (`.{name}.tmp{pid}`, a pattern the target cache cleans up after a kill).
pub fn replace_atomic(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
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
