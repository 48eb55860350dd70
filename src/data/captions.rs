//! Caption sets for distillation, read by one rule whatever the host (the CLI's
//! `cache-targets`, the C ABI, the ComfyUI training node):
//!
//! - a folder: every `.txt`, `.caption`, `.jsonl` and `.csv` file under it (recursively,
//!   hidden entries skipped, sorted by path), each read by the rule for its kind;
//! - a `.txt` or `.caption` file beside an image of the same name (kohya's layout): the whole
//!   file is that image's caption;
//! - any other text file, and inline text: one caption per line;
//! - `.jsonl`: one JSON object per line (`caption`, `text`, or a named column);
//! - `.csv`: RFC 4180 with a header row (`caption`, `text`, or a named column).
//!
//! In text files and inline text, a line starting with `#` is a comment. Every caption is
//! normalised the same way: each of its lines is trimmed, blank lines are dropped and the rest
//! joined with one space. Empty captions are dropped, and so are exact duplicates (the first
//! one is kept); both are counted in the [`CaptionReport`]. The order of the sources is kept,
//! so a caption set, its [`CaptionSet::fingerprint`] and everything derived from it are
//! reproducible.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Captions in source order, after normalisation, without empties and duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionSet {
    pub captions: Vec<String>,
    pub report: CaptionReport,
}

/// What loading a caption set found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionReport {
    /// The file or folder the captions came from.
    pub source: PathBuf,
    /// Captions read (records, files or lines), empty ones included.
    pub read: usize,
    /// Empty (or whitespace-only) captions dropped.
    pub empty: usize,
    /// Exact duplicates dropped (the first occurrence is kept).
    pub duplicates: usize,
    /// Captions kept: `read - empty - duplicates`.
    pub kept: usize,
}

impl fmt::Display for CaptionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {} kept of {} read ({} empty, {} {} dropped)",
            self.source.display(),
            self.kept,
            plural(self.kept, "caption"),
            self.read,
            self.empty,
            self.duplicates,
            plural(self.duplicates, "duplicate")
        )
    }
}

/// sha256 of a caption's UTF-8 bytes, first 16 bytes as lowercase hex (32 characters).
pub fn caption_hash(s: &str) -> String {
    hex16(&Sha256::digest(s.as_bytes()))
}

/// `sha256:` + the first 16 bytes (hex) of sha256 over the given caption hashes, in order,
/// each followed by `\n`. Shared by [`CaptionSet::fingerprint`] and the target cache.
pub fn fingerprint_of_hashes<S: AsRef<str>>(hashes: &[S]) -> String {
    let mut h = Sha256::new();
    for s in hashes {
        h.update(s.as_ref().as_bytes());
        h.update(b"\n");
    }
    format!("sha256:{}", hex16(&h.finalize()))
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

fn hex16(digest: &[u8]) -> String {
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

impl CaptionSet {
    /// Builds a set from raw captions, normalising, dropping empties and duplicates exactly as
    /// [`load_captions`] does. `source` is what the report and errors name.
    pub fn from_captions<I, S>(captions: I, source: impl Into<PathBuf>) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let source = source.into();
        let mut seen = HashSet::new();
        let mut kept = Vec::new();
        let (mut read, mut empty, mut duplicates) = (0, 0, 0);
        for c in captions {
            read += 1;
            let c = normalize(c.as_ref());
            if c.is_empty() {
                empty += 1;
            } else if seen.contains(&c) {
                duplicates += 1;
            } else {
                seen.insert(c.clone());
                kept.push(c);
            }
        }
        if kept.is_empty() {
            return Err(Error::format(
                &source,
                format!(
                    "no captions ({empty} empty, {duplicates} {})",
                    plural(duplicates, "duplicate")
                ),
            ));
        }
        let report = CaptionReport {
            source,
            read,
            empty,
            duplicates,
            kept: kept.len(),
        };
        Ok(Self {
            captions: kept,
            report,
        })
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// [`caption_hash`] of every caption, in order.
    pub fn hashes(&self) -> Vec<String> {
        self.captions.iter().map(|c| caption_hash(c)).collect()
    }

    /// `sha256:<32 hex>` over the ordered caption hashes: changes when any caption is edited,
    /// added, removed or moved.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_hashes(&self.hashes())
    }
}

/// The one normalisation every caption goes through: lines trimmed, blank lines dropped,
/// the rest joined with a space.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

/// Files a folder of captions is read from (lowercase extensions).
pub const CAPTION_EXTENSIONS: [&str; 4] = ["txt", "caption", "jsonl", "csv"];
/// Images that make a text file beside them that image's caption (kohya's layout).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Loads captions from `src` (a folder or a file; see the module doc). `column` names the
/// caption field of `.jsonl` and `.csv` files. `.json` is refused (it is not line based;
/// write `.jsonl`). Errors name the file, and for JSONL and CSV the 1-based line of the bad
/// record.
pub fn load_captions(src: &Path, column: Option<&str>) -> Result<CaptionSet> {
    CaptionSet::from_captions(read_source(src, column)?, src)
}

/// Captions from several sources, in order: each path (folder or file), then `text` (one
/// caption per line). Duplicates across sources are dropped like any other.
pub fn load_caption_sources(
    paths: &[PathBuf],
    text: Option<&str>,
    column: Option<&str>,
) -> Result<CaptionSet> {
    let mut raw = Vec::new();
    let mut named: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    for p in paths {
        raw.extend(read_source(p, column)?);
    }
    if let Some(t) = text.filter(|t| !t.trim().is_empty()) {
        raw.extend(caption_lines(t));
        named.push("the captions text".into());
    }
    if named.is_empty() {
        return Err(Error::Invalid(
            "no captions given: name a captions folder or file, or give captions text".into(),
        ));
    }
    CaptionSet::from_captions(raw, named.join(" + "))
}

/// The raw captions of one folder or file.
fn read_source(src: &Path, column: Option<&str>) -> Result<Vec<String>> {
    let meta = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    if !meta.is_dir() {
        return read_file(src, column, false);
    }
    let mut files = Vec::new();
    collect_files(src, &mut files, &mut HashSet::new())?;
    files.sort();
    if files.is_empty() {
        return Err(Error::format(
            src,
            format!(
                "no captions in this folder (no {} files found, subfolders included)",
                CAPTION_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
            ),
        ));
    }
    let mut raw = Vec::new();
    for f in &files {
        raw.extend(read_file(f, column, true)?);
    }
    Ok(raw)
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// One file's captions; `in_folder`: the column option may be meant for other files.
fn read_file(path: &Path, column: Option<&str>, in_folder: bool) -> Result<Vec<String>> {
    let text = read_text(path)?;
    match extension(path).as_str() {
        "jsonl" => parse_jsonl(path, &text, column),
        "csv" => parse_csv(path, &text, column),
        "json" => Err(Error::format(
            path,
            "a .json file is not a caption list; use .jsonl (one {\"caption\": ...} object per line), .csv or a text file with one caption per line",
        )),
        _ => {
            if let (Some(c), false) = (column, in_folder) {
                return Err(Error::Invalid(format!(
                    "a caption column (`{c}`) was given but {} is a plain text file (one caption per line); columns apply to .jsonl and .csv",
                    path.display()
                )));
            }
            if has_image_beside(path) {
                Ok(vec![caption_lines(&text).join("\n")])
            } else {
                Ok(caption_lines(&text))
            }
        }
    }
}

/// The lines of a text file or inline text, comments (`#`) left out.
fn caption_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn has_image_beside(path: &Path) -> bool {
    IMAGE_EXTENSIONS.iter().any(|ext| {
        [ext.to_string(), ext.to_ascii_uppercase()]
            .iter()
            .any(|e| path.with_extension(e).is_file())
    })
}

/// Reads a file as UTF-8 (a leading BOM is dropped), naming it on failure.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    match String::from_utf8(bytes) {
        Ok(mut s) => {
            if s.starts_with('\u{feff}') {
                s.drain(..3);
            }
            Ok(s)
        }
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            Err(Error::format(
                path,
                format!("not valid UTF-8 text (line {line}, byte {at}); captions must be UTF-8"),
            ))
        }
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<()> {
    // Guards against symlink loops.
    let canon = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canon) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            collect_files(&path, out, seen)?;
        } else if meta.is_file() && CAPTION_EXTENSIONS.contains(&extension(&path).as_str()) {
            out.push(path);
        }
    }
    Ok(())
}

fn parse_jsonl(path: &Path, text: &str, column: Option<&str>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::format(path, format!("line {line_no}: {msg}"));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON ({e})")))?;
        let caption = match &value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(map) => {
                let field = match column {
                    Some(c) => map.get(c).map(|v| (c, v)).ok_or_else(|| {
                        bad(format!("no field `{c}` (fields: {})", field_list(map)))
                    })?,
                    None => ["caption", "text"]
                        .iter()
                        .find_map(|k| map.get(*k).map(|v| (*k, v)))
                        .ok_or_else(|| {
                            bad(format!(
                                "no field `caption` or `text` (fields: {}); name the caption field with a column option",
                                field_list(map)
                            ))
                        })?,
                };
                match field.1 {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => {
                        return Err(bad(format!(
                            "field `{}` is {}, expected a string",
                            field.0,
                            json_kind(other)
                        )))
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "expected a JSON object with a caption field, found {}",
                    json_kind(other)
                )))
            }
        };
        out.push(caption);
    }
    Ok(out)
}

fn field_list(map: &serde_json::Map<String, serde_json::Value>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One CSV record and the 1-based line it starts on.
struct CsvRecord {
    line: usize,
    fields: Vec<String>,
}

/// RFC 4180 records: `,` separates fields, LF or CRLF ends a record, a field starting with
/// `"` is quoted (commas, newlines and `""` inside). A `"` inside an unquoted field is kept
/// as is. Blank lines are skipped.
fn csv_records(path: &Path, text: &str) -> Result<Vec<CsvRecord>> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    loop {
        if chars.peek().is_none() {
            break;
        }
        let start_line = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted_any = false;
        // One record.
        loop {
            // Start of a field.
            if chars.peek() == Some(&'"') {
                chars.next();
                quoted_any = true;
                let quote_line = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err(Error::format(
                                path,
                                format!("line {quote_line}: quoted field is never closed (a `\"` is missing)"),
                            ))
                        }
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                field.push('"');
                            } else {
                                break;
                            }
                        }
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') => {}
                    Some('\r') => {}
                    Some(c) => {
                        return Err(Error::format(
                            path,
                            format!(
                                "line {line}: unexpected `{c}` after a closing quote (a `\"` inside a quoted field must be doubled)"
                            ),
                        ))
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '\n' || c == '\r' {
                        break;
                    }
                    field.push(c);
                    chars.next();
                }
            }
            // End of a field.
            match chars.next() {
                Some(',') => {
                    fields.push(std::mem::take(&mut field));
                }
                Some('\r') => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some('\n') => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                None => {
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some(_) => unreachable!("fields stop only at separators"),
            }
        }
        let blank = !quoted_any && fields.len() == 1 && fields[0].trim().is_empty();
        if !blank {
            records.push(CsvRecord {
                line: start_line,
                fields,
            });
        }
    }
    Ok(records)
}

fn parse_csv(path: &Path, text: &str, column: Option<&str>) -> Result<Vec<String>> {
    let records = csv_records(path, text)?;
    let mut it = records.into_iter();
    let header = it
        .next()
        .ok_or_else(|| Error::format(path, "empty CSV file (no header row)"))?;
    let names: Vec<String> = header.fields.iter().map(|f| f.trim().to_string()).collect();
    let listed = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let col = match column {
        Some(c) => names.iter().position(|n| n == c).ok_or_else(|| {
            Error::format(
                path,
                format!("line {}: no column `{c}` in the header (columns: {listed})", header.line),
            )
        })?,
        None => ["caption", "text"]
            .iter()
            .find_map(|k| names.iter().position(|n| n == k))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "line {}: no column `caption` or `text` in the header (columns: {listed}); name the caption column with a column option",
                        header.line
                    ),
                )
            })?,
    };
    let mut out = Vec::new();
    for rec in it {
        if rec.fields.len() != names.len() {
            return Err(Error::format(
                path,
                format!(
                    "line {}: row has {} fields, the header has {} (an unquoted comma or a stray quote?)",
                    rec.line,
                    rec.fields.len(),
                    names.len()
                ),
            ));
        }
        out.push(rec.fields.into_iter().nth(col).unwrap_or_default());
    }
    Ok(out)
}
