//! Shard files: the safetensors bytes of one shard's targets, and their sha256.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use super::batch::ShardTargets;
use super::{shard_file_name, ShardEntry, CACHE_FORMAT};
use crate::error::{Error, Result};
use crate::formats::safetensors::write_atomic;

/// Raw little-endian tensor bytes for the safetensors writer.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw_float(t: &Tensor, f16: bool) -> Result<RawTensor> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, data) = if f16 {
        let v = flat.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
        let mut data = Vec::with_capacity(v.len() * 2);
        for x in &v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        (safetensors::Dtype::F16, data)
    } else {
        let v = flat.to_vec1::<f32>()?;
        let mut data = Vec::with_capacity(v.len() * 4);
        for x in &v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        (safetensors::Dtype::F32, data)
    };
    Ok(RawTensor { dtype, shape, data })
}

/// Writes the targets of captions `range` as shard `k` of `dir`, atomically; returns its
/// manifest entry.
pub(super) fn write_shard(
    dir: &Path,
    k: usize,
    range: Range<usize>,
    targets: &ShardTargets,
    f16: bool,
    teacher_fingerprint: &str,
) -> Result<ShardEntry> {
    let file = shard_file_name(k);
    let path = dir.join(&file);
    let data = serialize_shard(&path, targets, range.clone(), f16, teacher_fingerprint)?;
    let sha256 = sha256_hex(&data);
    write_atomic(&path, &data)?;
    Ok(ShardEntry {
        file,
        start: range.start,
        count: range.len(),
        sha256,
        bytes: data.len() as u64,
        truncated: targets.truncated,
    })
}

fn serialize_shard(
    path: &Path,
    targets: &ShardTargets,
    range: Range<usize>,
    f16: bool,
    teacher_fingerprint: &str,
) -> Result<Vec<u8>> {
    let (start, count) = (range.start, range.len());
    let index = RawTensor {
        dtype: safetensors::Dtype::U32,
        shape: vec![count],
        data: (start..start + count)
            .flat_map(|i| (i as u32).to_le_bytes())
            .collect(),
    };
    let embeds = raw_float(&targets.embeds, f16)?;
    let pooled = raw_float(&targets.pooled, f16)?;
    // One metadata key: the header's metadata map is written in hash-map order, and shard
    // files must be byte-for-byte reproducible.
    let info = serde_json::json!({
        "format": CACHE_FORMAT,
        "start": start,
        "count": count,
        "teacher_fingerprint": teacher_fingerprint,
    });
    let meta = HashMap::from([("qwenclip".to_string(), info.to_string())]);
    safetensors::tensor::serialize(
        [
            ("index", &index),
            ("pooled", &pooled),
            ("prompt_embeds", &embeds),
        ],
        Some(meta),
    )
    .map_err(|e| Error::format(path, format!("cannot serialise the shard: {e}")))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of a file, lowercase hex; streamed, as shards can be large.
pub(super) fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
