//! The teacher's targets for one shard, computed a batch at a time: batches never straddle
//! shards, so a shard is finished (and written) as soon as its last batch is.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::{TargetDims, TargetSource};
use crate::error::{Error, Result};

/// One shard's targets, f32 on the CPU.
pub(super) struct ShardTargets {
    pub embeds: Tensor,
    pub pooled: Tensor,
    /// Captions the teacher truncated.
    pub truncated: usize,
}

/// Encodes `captions[range]` `batch_size` captions at a time. `dims` are the cache's sizes
/// (`None` until the first batch sets them): every batch must match them. `on_batch` is
/// called with the number of captions of each finished batch.
pub(super) fn compute_shard(
    source: &dyn TargetSource,
    captions: &[String],
    range: Range<usize>,
    batch_size: usize,
    dims: &mut Option<TargetDims>,
    on_batch: &mut dyn FnMut(usize),
) -> Result<ShardTargets> {
    let mut embeds = Vec::new();
    let mut pooled = Vec::new();
    let mut truncated = 0usize;
    let mut b = range.start;
    while b < range.end {
        let e = (b + batch_size).min(range.end);
        let batch: Vec<&str> = captions[b..e].iter().map(String::as_str).collect();
        let (pe, po, dropped) = source.encode(&batch)?;
        let got = check_batch(source, &pe, &po, &dropped, batch.len())?;
        match *dims {
            None => *dims = Some(got),
            Some(d) if d != got => {
                return Err(Error::Invalid(format!(
                    "teacher {} returned prompt_embeds [_, {}, {}] / pooled [_, {}] for captions {b}..{e}, but the cache holds [_, {}, {}] / [_, {}]",
                    source.describe(),
                    got.seq,
                    got.embed,
                    got.pooled,
                    d.seq,
                    d.embed,
                    d.pooled
                )))
            }
            Some(_) => {}
        }
        embeds.push(pe.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        pooled.push(po.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        truncated += dropped.iter().filter(|&&d| d > 0).count();
        on_batch(e - b);
        b = e;
    }
    Ok(ShardTargets {
        embeds: Tensor::cat(&embeds, 0)?,
        pooled: Tensor::cat(&pooled, 0)?,
        truncated,
    })
}

/// Checks the shapes a teacher batch came back with; returns its dims.
fn check_batch(
    source: &dyn TargetSource,
    pe: &Tensor,
    po: &Tensor,
    dropped: &[usize],
    n: usize,
) -> Result<TargetDims> {
    let (ped, pod) = (pe.dims(), po.dims());
    if ped.len() != 3 || ped[0] != n || pod.len() != 2 || pod[0] != n || dropped.len() != n {
        return Err(Error::Invalid(format!(
            "teacher {} returned prompt_embeds {ped:?}, pooled {pod:?} and {} dropped-token counts for {n} captions; expected [{n}, S, D], [{n}, P] and {n}",
            source.describe(),
            dropped.len()
        )));
    }
    if ped[1] == 0 || ped[2] == 0 || pod[1] == 0 {
        return Err(Error::Invalid(format!(
            "teacher {} returned empty tensors: prompt_embeds {ped:?}, pooled {pod:?}",
            source.describe()
        )));
    }
    Ok(TargetDims {
        seq: ped[1],
        embed: ped[2],
        pooled: pod[1],
    })
}
