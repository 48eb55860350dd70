//! Caption sets for distillation: a kohya-style folder of `.txt` files, `.jsonl`, `.csv`, or a
//! plain file with one caption per line.
//!
//! Every caption is normalised the same way whatever its source: each of its lines is trimmed,
//! blank lines are dropped and the rest joined with one space (so `"a cat\n  on a mat "` and
//! `"a cat on a mat"` are the same caption). Empty captions are dropped, and so are exact
//! duplicates (the first one is kept); both are counted in the [`CaptionReport`]. The order of
//! the source is kept (a folder is read in path order), so a caption set, its
//! [`CaptionSet::fingerprint`] and everything derived from it are reproducible.

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

/// Loads captions from `src`:
///
/// - a folder: every `.txt` file under it (recursively, hidden entries skipped, sorted by
///   path), one caption per file; images next to them are ignored (kohya layout);
/// - `.jsonl`: one JSON object per line, the caption in `column` if given, else `caption`,
///   else `text` (a line holding a bare JSON string is that caption); blank lines are skipped;
/// - `.csv`: RFC 4180 (header row, `"`-quoted fields with commas, `""` and newlines), the
///   caption in `column` if given, else `caption`, else `text`;
/// - any other file: one caption per line (blank lines are empty captions).
///
/// `.json` is refused (it is not line based; write `.jsonl`). Errors name the file, and for
/// JSONL and CSV the 1-based line of the bad record.
pub fn load_captions(src: &Path, column: Option<&str>) -> Result<CaptionSet> {
    let meta = std::fs::metadata(src).map_err(|e| Error::io(src, e))?;
    if meta.is_dir() {
        if column.is_some() {
            return Err(Error::Invalid(format!(
                "a caption column was given but {} is a folder of .txt files (columns apply to .jsonl and .csv)",
                src.display()
            )));
        }
        let mut files = Vec::new();
        collect_txt(src, &mut files, &mut HashSet::new())?;
        files.sort();
        if files.is_empty() {
            return Err(Error::format(
                src,
                "no captions in this folder (no .txt files found, subfolders included)",
            ));
        }
        let mut raw = Vec::with_capacity(files.len());
        for f in &files {
            raw.push(read_text(f)?);
        }
        return CaptionSet::from_captions(raw, src);
    }
    let text = read_text(src)?;
    let ext = src
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let raw = match ext.as_str() {
        "jsonl" => parse_jsonl(src, &text, column)?,
        "csv" => parse_csv(src, &text, column)?,
        "json" => {
            return Err(Error::format(
                src,
                "a .json file is not a caption list; use .jsonl (one {\"caption\": ...} object per line), .csv or a text file with one caption per line",
            ))
        }
        _ => {
            if let Some(c) = column {
                return Err(Error::Invalid(format!(
                    "a caption column (`{c}`) was given but {} is a plain text file (one caption per line); columns apply to .jsonl and .csv",
                    src.display()
                )));
            }
            text.lines().map(str::to_string).collect()
        }
    };
    CaptionSet::from_captions(raw, src)
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

fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<()> {
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
            collect_txt(&path, out, seen)?;
        } else if meta.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
        {
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
