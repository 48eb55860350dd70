//! [`TargetCache`]: a finished cache, open for reading batches of targets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::caption_diff::describe_caption_diff;
use super::shard::sha256_file;
use super::{split_indices, Manifest, ShardEntry, TargetDims, MANIFEST_FILE};
use crate::data::captions::CaptionSet;
use crate::error::{read_json, Error, Result};

/// How many shards [`TargetCache::get_batch`] keeps memory-mapped at once.
const MAPPED_SHARDS: usize = 32;

/// A finished target cache, open for reading. `Send + Sync`: `get_batch` takes `&self`.
pub struct TargetCache {
    dir: PathBuf,
    manifest: Manifest,
    mapped: Mutex<Vec<(usize, Arc<MmapedSafetensors>)>>,
}

impl std::fmt::Debug for TargetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetCache")
            .field("dir", &self.dir)
            .field("count", &self.manifest.count)
            .field("dims", &self.manifest.dims)
            .field("dtype", &self.manifest.dtype)
            .finish()
    }
}

impl TargetCache {
    pub(super) fn from_parts(dir: PathBuf, manifest: Manifest) -> Self {
        Self {
            dir,
            manifest,
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// Opens a cache, validating its manifest and the sha256 of every shard.
    pub fn open(dir: &Path) -> Result<Self> {
        let cache = Self::open_unverified(dir)?;
        cache.verify()?;
        Ok(cache)
    }

    /// Opens a cache, validating its manifest, that every shard is present and of the
    /// recorded size, without hashing the shards (fast for big caches).
    pub fn open_unverified(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            let msg = if dir.is_dir() {
                format!("not a target cache (no {MANIFEST_FILE}); build one with cache-targets")
            } else {
                "no such folder".to_string()
            };
            return Err(Error::format(dir, msg));
        }
        let m: Manifest = read_json(&path, "target cache manifest")?;
        m.validate(&path)?;
        for s in &m.shards {
            let p = dir.join(&s.file);
            let meta = std::fs::metadata(&p).map_err(|_| {
                Error::format(
                    &p,
                    "shard file is missing; rerun cache-targets (same teacher and captions) to rebuild it",
                )
            })?;
            if meta.len() != s.bytes {
                return Err(Error::format(
                    &p,
                    format!(
                        "shard is corrupt: {} bytes, the manifest says {}; rerun cache-targets (same teacher and captions) to rebuild it",
                        meta.len(),
                        s.bytes
                    ),
                ));
            }
        }
        Ok(Self::from_parts(dir.to_path_buf(), m))
    }

    /// Checks the sha256 of every shard (what [`TargetCache::open`] does).
    pub fn verify(&self) -> Result<()> {
        for s in &self.manifest.shards {
            let p = self.dir.join(&s.file);
            let sha = sha256_file(&p).map_err(|e| Error::io(&p, e))?;
            if sha != s.sha256 {
                return Err(Error::format(
                    &p,
                    format!(
                        "shard is corrupt (sha256 {sha}, the manifest says {}); rerun cache-targets (same teacher and captions) to rebuild it",
                        s.sha256
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a cache made with another teacher (`source_fingerprint`) or for other
    /// captions, saying what differs.
    pub fn check_against(
        &self,
        source_fingerprint: Option<&str>,
        captions: Option<&CaptionSet>,
    ) -> Result<()> {
        let path = self.dir.join(MANIFEST_FILE);
        if let Some(fp) = source_fingerprint {
            if fp != self.manifest.teacher_fingerprint {
                return Err(Error::format(
                    &path,
                    format!(
                        "this cache was made with another teacher ({} [{}], not [{fp}]); rerun cache-targets with this teacher into a new folder (or with --overwrite)",
                        self.manifest.teacher, self.manifest.teacher_fingerprint
                    ),
                ));
            }
        }
        if let Some(c) = captions {
            let hashes = c.hashes();
            if hashes != self.manifest.caption_hashes {
                let diff = describe_caption_diff(
                    &self.manifest.caption_hashes,
                    Some(&self.manifest.captions),
                    &hashes,
                    &c.captions,
                );
                return Err(Error::format(
                    &path,
                    format!(
                        "this cache was made for other captions than {}: {diff}; rerun cache-targets with these captions",
                        c.report.source.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.manifest.count
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.count == 0
    }

    /// Caption texts, in cache order (index `i` of [`TargetCache::get_batch`]).
    pub fn captions(&self) -> &[String] {
        &self.manifest.captions
    }

    pub fn dims(&self) -> TargetDims {
        self.manifest.dims
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Targets of the given captions (positions in the cache, any order, repeats allowed):
    /// prompt_embeds `[n, seq, embed]` and pooled `[n, pooled]`, f32 on `device`.
    /// Shards are memory-mapped as needed (the last few stay mapped).
    pub fn get_batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        if indices.is_empty() {
            return Err(Error::Invalid("get_batch: no indices".into()));
        }
        let TargetDims { seq, embed, pooled } = self.manifest.dims;
        let row_e = seq * embed;
        let mut out_e = Vec::with_capacity(indices.len() * row_e);
        let mut out_p = Vec::with_capacity(indices.len() * pooled);
        let f16 = self.manifest.dtype == "f16";
        for &i in indices {
            if i >= self.manifest.count {
                return Err(Error::Invalid(format!(
                    "caption index {i} is out of range: the cache in {} holds {} captions",
                    self.dir.display(),
                    self.manifest.count
                )));
            }
            let k = i / self.manifest.shard_size;
            let row = i - self.manifest.shards[k].start;
            let st = self.shard(k)?;
            let path = self.dir.join(&self.manifest.shards[k].file);
            let ve = st
                .get("prompt_embeds")
                .map_err(|e| Error::format(&path, format!("tensor `prompt_embeds`: {e}")))?;
            let vp = st
                .get("pooled")
                .map_err(|e| Error::format(&path, format!("tensor `pooled`: {e}")))?;
            push_row(&mut out_e, ve.data(), row, row_e, f16);
            push_row(&mut out_p, vp.data(), row, pooled, f16);
        }
        let n = indices.len();
        let e = Tensor::from_vec(out_e, (n, seq, embed), &Device::Cpu)?.to_device(device)?;
        let p = Tensor::from_vec(out_p, (n, pooled), &Device::Cpu)?.to_device(device)?;
        Ok((e, p))
    }

    /// Shard `k`, mapped and checked (tensor names, dtypes, shapes, index), through the LRU.
    fn shard(&self, k: usize) -> Result<Arc<MmapedSafetensors>> {
        let mut lru = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = lru.iter().position(|(i, _)| *i == k) {
            let item = lru.remove(pos);
            let st = item.1.clone();
            lru.push(item);
            return Ok(st);
        }
        let entry = &self.manifest.shards[k];
        let path = self.dir.join(&entry.file);
        // Safety: mapped read-only; shards are only ever replaced by rename, which leaves an
        // existing mapping intact.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
            Error::format(
                &path,
                format!("not a valid shard ({e}); rerun cache-targets (same teacher and captions) to rebuild it"),
            )
        })?;
        self.check_shard(&path, &st, entry)?;
        let st = Arc::new(st);
        if lru.len() >= MAPPED_SHARDS {
            lru.remove(0);
        }
        lru.push((k, st.clone()));
        Ok(st)
    }

    fn check_shard(&self, path: &Path, st: &MmapedSafetensors, entry: &ShardEntry) -> Result<()> {
        let d = self.manifest.dims;
        let float = if self.manifest.dtype == "f16" {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::F32
        };
        let n = entry.count;
        let expect: [(&str, safetensors::Dtype, Vec<usize>); 3] = [
            ("prompt_embeds", float, vec![n, d.seq, d.embed]),
            ("pooled", float, vec![n, d.pooled]),
            ("index", safetensors::Dtype::U32, vec![n]),
        ];
        for (name, dtype, shape) in expect {
            let v = st.get(name).map_err(|_| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
            if v.shape() != shape.as_slice() {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    expected: shape,
                    got: v.shape().to_vec(),
                });
            }
            if v.dtype() != dtype {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` is {:?}, expected {dtype:?}", v.dtype()),
                ));
            }
            if name == "index" {
                let ok = v.data().chunks_exact(4).enumerate().all(|(i, b)| {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize == entry.start + i
                });
                if !ok {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor `index` does not hold captions {}..{}; rerun cache-targets to rebuild this shard",
                            entry.start,
                            entry.start + n
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deterministic split into (train, held_out) caption indices, both sorted. `held_out` is
    /// the held-out fraction; when it is > 0 and the cache has at least 2 captions, at least
    /// one is held out and at least one is kept for training.
    pub fn split(&self, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        split_indices(self.len(), held_out, seed)
    }
}

fn push_row(out: &mut Vec<f32>, data: &[u8], row: usize, row_len: usize, f16: bool) {
    if f16 {
        let bytes = &data[row * row_len * 2..(row + 1) * row_len * 2];
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        );
    } else {
        let bytes = &data[row * row_len * 4..(row + 1) * row_len * 4];
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
}
