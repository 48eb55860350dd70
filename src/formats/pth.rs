//! PyTorch `.pth` state dicts: a zip-format pickle, optionally nested under a key, renamed
//! into our layout by a key map (see `docs/adapter-format.md`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyMap {
    #[serde(default)]
    pub nested_key: Option<String>,
    #[serde(default)]
    pub strip_prefixes: Vec<String>,
    #[serde(default)]
    pub rename: Vec<(String, String)>,
    /// Fields that tensor shapes cannot tell: `heads`, `norm_eps`.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl KeyMap {
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path, "key map")
    }

    pub fn apply(&self, key: &str) -> String {
        let mut k = key;
        if let Some(p) = self
            .strip_prefixes
            .iter()
            .find(|p| k.starts_with(p.as_str()))
        {
            k = &k[p.len()..];
        }
        let mut out = k.to_string();
        for (from, to) in &self.rename {
            out = out.replace(from, to);
        }
        out
    }
}

/// Reads the tensors of a zip-format `.pth`, renamed through `map`.
pub fn read_pth(path: &Path, map: &KeyMap) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path).map_err(|e| Error::io(path, e))?,
        &mut head,
    )
    .map_err(|_| Error::format(path, "not a .pth file (too short)"))?;
    if &head != b"PK\x03\x04" {
        return Err(Error::format(
            path,
            "not a zip-format .pth (legacy torch.save format or not a PyTorch file); re-save it with torch.save(obj, f) from PyTorch >= 1.6",
        ));
    }
    check_pickle_lengths(path)?;
    let pairs = candle_core::pickle::read_all_with_key(path, map.nested_key.as_deref())
        .map_err(|e| Error::format(path, format!("cannot read the pickled state dict: {e}")))?;
    if pairs.is_empty() {
        let under = map
            .nested_key
            .as_deref()
            .map_or(String::new(), |k| format!(" under key \"{k}\""));
        return Err(Error::format(path, format!("holds no tensors{under}")));
    }
    Ok(pairs.into_iter().map(|(k, t)| (map.apply(&k), t)).collect())
}

/// Refuses a pickle whose string lengths run past its end: candle's unpickler allocates what a
/// length says before it reads, so a corrupt length would ask for gigabytes.
fn check_pickle_lengths(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::format(path, format!("not a readable zip archive ({e})")))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    for name in pickles {
        let entry = zip
            .by_name(&name)
            .map_err(|e| Error::format(path, format!("`{name}`: {e}")))?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(entry, len), &mut data)
            .map_err(|e| Error::format(path, format!("`{name}`: {e}")))?;
        if let Err(at) = scan_pickle(&data) {
            return Err(Error::format(
                path,
                format!("`{name}`: the pickle opcode at byte {at} needs more data than the pickle holds (a corrupt file)"),
            ));
        }
    }
    Ok(())
}

/// Walks the opcodes candle's unpickler knows; `Err(offset)` for one whose argument runs past
/// the end. An opcode it does not know ends the walk (the unpickler stops there too).
fn scan_pickle(p: &[u8]) -> std::result::Result<(), usize> {
    let mut i = 0;
    while i < p.len() {
        let at = i;
        i += 1;
        let rest = &p[i..];
        let arg = match p[at] {
            b'.' => return Ok(()),
            b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b's'
            | b'u' | b'}' | b'd' | b'b' | 0x81 | b']' | b'a' | b'e' => 0,
            0x80 | b'q' | b'h' | b'K' => 1,
            b'M' => 2,
            b'r' | b'j' | b'J' => 4,
            b'G' => 8,
            0x8a => 1 + rest.first().map_or(0, |&n| n as usize),
            b'X' => match rest.get(..4) {
                Some(b) => 4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                None => 4,
            },
            b'c' => {
                // module and name, each up to a newline
                let mut lines = rest.iter().enumerate().filter(|(_, &b)| b == b'\n');
                match lines.nth(1) {
                    Some((end, _)) => end + 1,
                    None => rest.len() + 1,
                }
            }
            _ => return Ok(()),
        };
        if arg > rest.len() {
            return Err(at);
        }
        i += arg;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::scan_pickle;

    #[test]
    fn a_string_longer_than_the_pickle_is_caught_before_it_is_read() {
        // PROTO 2, BINUNICODE "ab", STOP
        assert_eq!(scan_pickle(b"\x80\x02X\x02\x00\x00\x00ab."), Ok(()));
        // BINUNICODE claiming 3.5 GB
        assert_eq!(scan_pickle(b"\x80\x02X\x97\xff\xd8\xd4ab."), Err(2));
        assert_eq!(scan_pickle(b"\x80\x02cmod\nname"), Err(2));
        assert_eq!(scan_pickle(b"\x80\x02cmod\nname\n."), Ok(()));
    }
}
